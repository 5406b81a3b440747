"""Operator scale against the test API server (tests/support/kube): a 1,024-worker job (the
size of a published 1,024-accelerator foundation stage, at one accelerator per worker) and 100
small jobs at once.

    .venv/bin/python bench/operator_scale.py [--workers 1024] [--jobs 100]

The 1,024-worker job is driven by calling ``reconcile`` directly, so each phase is timed alone:
the first pass creates the job's objects and a standby pod per slot; the scheduler and kubelets
(played by the bench, timed apart: not ours) place them; the second pass starts the group
(deletes the standbys, creates 1,024 worker pods, writes status). A steady-state reconcile then
changes nothing: its time and its API requests are the operator's standing cost per job.

Baselines, measured in the same run against the same server: creating the same 1,024 pods with
the same client (what any operator must pay for the group), and one LIST of them (what any
level-triggered reconcile must pay). The 100 jobs run under the real operator (kopf daemons),
from creation until every job reports Running with its two workers.

Goals: group created in <= 10 s, steady reconcile <= 50 ms and O(1) requests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain_operator.kube.client import KubeClient
from pretrain_operator.kube.reconcile import reconcile

from tests.operator.conftest import job, running_operator
from tests.support.cluster import Cluster, eventually
from tests.support.kube.apiserver import ApiServer, load_yaml_documents
from tests.support.kube.conftest import CRD_PATH

JOBS = "/apis/pretrain.dev/v1alpha1/namespaces/default/pretrainjobs"


def _server() -> ApiServer:
    server = ApiServer(history_limit=100_000).__enter__()
    with server.client() as api:
        extensions: Any = kubernetes.client.ApiextensionsV1Api(api)
        core: Any = kubernetes.client.CoreV1Api(api)
        for crd in load_yaml_documents(CRD_PATH):
            extensions.create_custom_resource_definition(crd)
        for name in ("default", "baseline"):
            core.create_namespace({"metadata": {"name": name}})
    return server


def _big_job(workers: int) -> dict[str, Any]:
    body = job("big", stages=1)
    body["spec"]["elastic"] = {"minWorkers": workers, "maxWorkers": workers}
    body["spec"]["stages"][0]["globalBatchSize"] = workers * 4
    return body


def _pass(
    client: KubeClient, cache: tuple[list[Any], dict[str, bool]] | None = None
) -> tuple[float, int]:
    """One reconcile of the big job: seconds, API requests. With ``cache`` (the pods and node
    readiness the operator's watches keep), no LIST is needed."""
    before = sum(client.requests.values())
    started = time.perf_counter()
    body = client.get_job("default", "big")
    assert body is not None
    pods, readiness = cache if cache is not None else (None, None)
    reconcile(client, body, now=datetime.now(UTC), pods=pods, readiness=readiness)
    return time.perf_counter() - started, sum(client.requests.values()) - before


def one_big_job(workers: int) -> None:
    server = _server()
    try:
        cluster = Cluster(server, nodes=workers)  # no kubelet thread: the bench plays it
        client = KubeClient(server.client())
        client.request("POST", JOBS, body=_big_job(workers))
        first, first_requests = _pass(client)
        started = time.perf_counter()
        cluster.schedule()
        kubelet = time.perf_counter() - started
        second, second_requests = _pass(client)
        pods = cluster.pods("worker")
        assert len(pods) == workers, len(pods)
        cluster.schedule()
        _pass(client)  # Running
        listed = [_pass(client) for _ in range(10)]
        cache = (
            client.list_pods("default", selector="pretrain.dev/job=big"),
            {n: True for n in cluster.ready_nodes()},
        )
        cached = [_pass(client, cache) for _ in range(10)]
        seconds = statistics.median(s for s, _ in cached)
        requests = max(r for _, r in cached)
        listed_seconds = statistics.median(s for s, _ in listed)
        listed_requests = max(r for _, r in listed)

        template = pods[0]
        started = time.perf_counter()
        for i in range(workers):
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "spec": template["spec"],
                "metadata": {"name": f"raw-{i}", "labels": {"raw": "yes"}},
            }
            client.create(pod, namespace="baseline")
        raw_create = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(10):
            client.list_pods("baseline", selector="raw=yes")
        raw_list = (time.perf_counter() - started) / 10
    finally:
        server.__exit__(None, None, None)
    group = first + second
    print(f"one job of {workers} workers")
    print(
        f"  first pass (job objects, {workers} standbys)   {first:7.2f} s  "
        f"{first_requests} requests"
    )
    print(f"  scheduler + kubelets (the bench, not ours)   {kubelet:7.2f} s")
    print(
        f"  second pass (start: {workers} workers)         {second:7.2f} s  "
        f"{second_requests} requests"
    )
    print(
        f"  group created: {group:.2f} s (goal <= 10 s); baseline: {workers} bare pod creates "
        f"{raw_create:.2f} s; ratio {group / raw_create:.2f}"
    )
    print(
        f"  steady reconcile from the watch cache (what the operator does): "
        f"{seconds * 1000:.1f} ms (goal <= 50 ms), {requests} request(s) (goal O(1))"
    )
    print(
        f"  steady reconcile listing pods and nodes instead: {listed_seconds * 1000:.1f} ms, "
        f"{listed_requests} requests"
    )
    print(
        f"  baseline: one LIST of {workers} pods {raw_list * 1000:.1f} ms; ratios: cached "
        f"{seconds / raw_list:.2f}, listing {listed_seconds / raw_list:.2f}"
    )


def many_small_jobs(count: int) -> None:
    server = _server()
    try:
        with Cluster(server, nodes=count * 2 + 8) as cluster:
            client = cluster.client
            with running_operator(server, resync_seconds=30.0):
                started = time.perf_counter()
                for i in range(count):
                    client.request("POST", JOBS, body=job(f"small-{i}"))

                def all_running() -> bool:
                    jobs = server.objects("pretrainjobs", "default")
                    phases = [(j.get("status") or {}).get("phase") for j in jobs]
                    return len(jobs) == count and all(p == "Running" for p in phases)

                eventually(all_running, timeout=600, what=f"{count} jobs Running")
                elapsed = time.perf_counter() - started
                workers = len(cluster.pods("worker"))
    finally:
        server.__exit__(None, None, None)
    print(f"{count} jobs of 2 workers created at once (kopf daemons, one operator)")
    print(
        f"  all Running after {elapsed:.2f} s ({workers} worker pods; "
        f"{elapsed / count * 1000:.0f} ms per job)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=100)
    args = parser.parse_args()
    one_big_job(args.workers)
    if args.jobs:
        many_small_jobs(args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
