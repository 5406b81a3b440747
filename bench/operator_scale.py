"""Operator scale against the real control plane (tests/controlplane: etcd, kube-apiserver,
kube-scheduler, kube-controller-manager), with 128 test-kubelet nodes of 8 GPUs: a 1,024-worker
job (the size of a published 1,024-accelerator foundation stage, one GPU per worker) and 100
small jobs at once. The operator runs as the chart's ServiceAccount, installed by Helm.

    .venv/bin/python bench/operator_scale.py [--cluster real] [--workers 1024] [--jobs 100]

The 1,024-worker job is first driven by calling ``reconcile`` directly, so each share is timed
alone: the first pass creates the job's objects and a standby pod per slot; the real scheduler
binds them and the test kubelet marks them Running (both timed apart: not ours); the second
pass starts the group (deletes the standbys, creates 1,024 workers), which the scheduler binds
and the kubelet runs. A steady reconcile then changes nothing: its time and its API requests
are the operator's standing cost per job. The same job is then run by the real operator (kopf)
from submission to every worker Running.

Baselines, measured in the same run against the same server: creating the same 1,024 pods with
the same client (what any operator must pay for the group), and one LIST of them (what any
level-triggered reconcile must pay). The 100 jobs run under the real operator, from creation
until every job reports Running with its two workers.

Worker pods run agents (the default): a third pass tells each agent its share of the attempt,
and the operator keeps the agents' states between passes (``AgentCache``), so a steady pass
reads none of them.

Goals: submission to every worker running <= 10 s, steady reconcile <= 10 ms and O(1) requests.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain_operator.kube.agents import AgentCache
from pretrain_operator.kube.client import KubeClient
from pretrain_operator.kube.reconcile import WRITES_IN_FLIGHT, reconcile
from pretrain_operator.kube.settings import OperatorSettings

from tests.operator.conftest import job, running_operator
from tests.support.controlplane import ControlPlane, unavailable
from tests.support.fixtures import Identity, install_chart, restricted_namespace
from tests.support.kubelet import Kubelet, eventually

GPUS_PER_NODE = 8


def _big_job(workers: int, namespace: str) -> dict[str, Any]:
    body = job("big", stages=1, namespace=namespace)
    body["spec"]["elastic"] = {"minWorkers": workers, "maxWorkers": workers}
    body["spec"]["resources"] = {"limits": {"nvidia.com/gpu": 1}}
    body["spec"]["stages"][0]["globalBatchSize"] = workers * 4
    return body


def _kubelet(plane: ControlPlane, namespace: str, workers: int) -> Kubelet:
    restricted_namespace(plane, namespace)
    kubelet = Kubelet(plane, namespace, nodes=0, gpus=GPUS_PER_NODE, workers=16)
    for _ in range(-(-workers // GPUS_PER_NODE)):
        kubelet.add_node()
    return kubelet


AGENTS = AgentCache(refresh_seconds=OperatorSettings().agent_poll_seconds)
"""The big job's worker agents' states between passes, as the operator keeps them."""


def _pass(
    client: KubeClient, namespace: str, cache: tuple[list[Any], dict[str, bool]] | None = None
) -> tuple[float, int, int]:
    """One reconcile of the big job: seconds, API requests, agents read. With ``cache`` (the
    pods and node readiness the operator's watches keep), no LIST is needed."""
    before, read = sum(client.requests.values()), AGENTS.reads
    started = time.perf_counter()
    body = client.get_job(namespace, "big")
    assert body is not None
    pods, readiness = cache if cache is not None else (None, None)
    reconcile(client, body, now=datetime.now(UTC), pods=pods, readiness=readiness, agents=AGENTS)
    requests = sum(client.requests.values()) - before
    return time.perf_counter() - started, requests, AGENTS.reads - read


def _agents_running(kubelet: Kubelet, count: int) -> bool:
    with kubelet.lock:
        doubles = list(kubelet.agents.values())
    return sum(1 for d in doubles if d.state().running) >= count


def _placed(kubelet: Kubelet, role: str, count: int, since: float) -> tuple[float, float]:
    """Wait for ``count`` pods of ``role`` to run; the scheduler's share (from ``since`` to the
    last bound) and the kubelet's (from then to the last marked Running)."""

    def uids() -> list[str]:
        return [p["metadata"]["uid"] for p in kubelet.pods(role) if p["spec"].get("nodeName")]

    def done() -> list[str]:
        found = uids()
        ok = len(found) == count and all(u in kubelet.running_at for u in found)
        return found if ok else []

    found = eventually(done, timeout=300, what=f"{count} {role} pods Running")
    bound = max(kubelet.bound_at[u] for u in found)
    running = max(kubelet.running_at[u] for u in found)
    # What was left once the pass ended (the scheduler binds while the pass still creates).
    return max(0.0, bound - since), max(0.0, running - max(bound, since))


def one_big_job(plane: ControlPlane, identity: Identity, workers: int) -> None:
    namespace = "big"
    with _kubelet(plane, namespace, workers) as kubelet:
        client = KubeClient(plane.client(identity.token))
        kubelet.client.request(
            "POST",
            f"/apis/pretrain.dev/v1alpha1/namespaces/{namespace}/pretrainjobs",
            body=_big_job(workers, namespace),
        )
        first, first_requests, _ = _pass(client, namespace)
        sched1, kubelet1 = _placed(kubelet, "standby", workers, time.monotonic())
        second, second_requests, _ = _pass(client, namespace)
        sched2, kubelet2 = _placed(kubelet, "worker", workers, time.monotonic())
        # Each worker's agent is told its share (its pod relabelled, then PUT /attempt).
        third, third_requests, third_reads = _pass(client, namespace)
        assert _agents_running(kubelet, workers), "not every agent got its order"
        fourth, _, _ = _pass(client, namespace)  # the group is Running
        listed = [_pass(client, namespace) for _ in range(10)]
        cache = (
            client.list_pods(namespace, selector="pretrain.dev/job=big"),
            {n: True for n in kubelet.ready_nodes()},
        )
        cached = [_pass(client, namespace, cache) for _ in range(10)]
        seconds = statistics.median(s for s, _, _ in cached)
        requests = max(r for _, r, _ in cached)
        reads = max(a for _, _, a in cached)
        listed_seconds = statistics.median(s for s, _, _ in listed)
        listed_requests = max(r for _, r, _ in listed)

        template = kubelet.pods("worker")[0]
        kubelet.client.request(
            "DELETE", f"/apis/pretrain.dev/v1alpha1/namespaces/{namespace}/pretrainjobs/big"
        )
        eventually(lambda: kubelet.pods() == [], timeout=300, what="big job collected")

        def bare(i: int) -> dict[str, Any]:
            return {
                "apiVersion": "v1",
                "kind": "Pod",
                # The job's ServiceAccount went with it.
                "spec": {
                    **template["spec"],
                    "nodeName": None,
                    "hostname": f"raw-{i}",
                    "serviceAccountName": "default",
                },
                "metadata": {"name": f"raw-{i}", "labels": {"raw": "yes"}},
            }

        started = time.perf_counter()
        for i in range(workers):
            client.create(bare(i), namespace=namespace)
        raw_create = time.perf_counter() - started
        kubelet.client.request(
            "DELETE", f"/api/v1/namespaces/{namespace}/pods", body={"gracePeriodSeconds": 0}
        )
        eventually(lambda: kubelet.pods() == [], timeout=300, what="baseline pods deleted")
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=WRITES_IN_FLIGHT) as pool:
            list(pool.map(lambda i: client.create(bare(i), namespace=namespace), range(workers)))
        raw_parallel = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(10):
            client.list_pods(namespace, selector="raw=yes")
        raw_list = (time.perf_counter() - started) / 10
        kubelet.client.request(
            "DELETE", f"/api/v1/namespaces/{namespace}/pods", body={"gracePeriodSeconds": 0}
        )
        eventually(lambda: kubelet.pods() == [], timeout=300, what="baseline pods deleted")
        operator_share = first + second + third + fourth
        total = operator_share + sched1 + kubelet1 + sched2 + kubelet2

        with running_operator(plane, identity, namespace, resync_seconds=30.0):
            submitted = time.monotonic()
            kubelet.client.request(
                "POST",
                f"/apis/pretrain.dev/v1alpha1/namespaces/{namespace}/pretrainjobs",
                body=_big_job(workers, namespace),
            )
            eventually(
                lambda: _agents_running(kubelet, workers), timeout=300, what="every agent running"
            )
            end_to_end = time.monotonic() - submitted
        kubelet.remove_nodes()

    print(f"one job of {workers} workers, {workers // GPUS_PER_NODE} nodes of {GPUS_PER_NODE} GPUs")
    print(f"  first pass (job objects, {workers} standbys)   {first:7.2f} s  {first_requests} req")
    print(f"  scheduler binds the rest (not ours)          {sched1:7.2f} s")
    print(f"  test kubelet runs them (not ours)            {kubelet1:7.2f} s")
    print(
        f"  second pass (start: {workers} workers)         {second:7.2f} s  {second_requests} req"
    )
    print(f"  scheduler binds the rest (not ours)          {sched2:7.2f} s")
    print(f"  test kubelet runs them (not ours)            {kubelet2:7.2f} s")
    print(
        f"  third pass (orders: {workers} agents told)      {third:7.2f} s  {third_requests} req, "
        f"{third_reads} agents read"
    )
    print(f"  fourth pass (status: Running)                {fourth:7.2f} s")
    print(
        f"  submit to every worker Running, pass by pass: {total:.2f} s (goal <= 10 s), of which "
        f"the operator {operator_share:.2f} s; baseline: {workers} bare pod creates "
        f"{raw_create:.2f} s one at a time, {raw_parallel:.2f} s {WRITES_IN_FLIGHT} at once; "
        f"ratio operator/baseline {operator_share / raw_parallel:.2f}"
    )
    print(f"  the same under the real operator (kopf), submit to all Running: {end_to_end:.2f} s")
    print(
        f"  steady reconcile from the watch cache (what the operator does): "
        f"{seconds * 1000:.1f} ms (goal <= 10 ms), {requests} request(s) (goal O(1)), "
        f"{reads} agents read"
    )
    print(
        f"  steady reconcile listing pods and nodes instead: {listed_seconds * 1000:.1f} ms, "
        f"{listed_requests} requests"
    )
    print(
        f"  baseline: one LIST of {workers} pods {raw_list * 1000:.1f} ms; ratios: cached "
        f"{seconds / raw_list:.2f}, listing {listed_seconds / raw_list:.2f}"
    )


def many_small_jobs(plane: ControlPlane, identity: Identity, count: int) -> None:
    namespace = "many"
    with _kubelet(plane, namespace, (count * 2 + 8) * GPUS_PER_NODE) as kubelet:
        with running_operator(plane, identity, namespace, resync_seconds=30.0):
            started = time.perf_counter()
            for i in range(count):
                kubelet.client.request(
                    "POST",
                    f"/apis/pretrain.dev/v1alpha1/namespaces/{namespace}/pretrainjobs",
                    body=job(f"small-{i}", namespace=namespace),
                )

            def all_running() -> bool:
                jobs = kubelet.objects("pretrainjobs")
                phases = [(j.get("status") or {}).get("phase") for j in jobs]
                return len(jobs) == count and all(p == "Running" for p in phases)

            eventually(all_running, timeout=600, what=f"{count} jobs Running")
            elapsed = time.perf_counter() - started
            workers = len(kubelet.pods("worker"))
        kubelet.remove_nodes()
    print(f"{count} jobs of 2 workers created at once (kopf daemons, one operator)")
    print(
        f"  all Running after {elapsed:.2f} s ({workers} worker pods; "
        f"{elapsed / count * 1000:.0f} ms per job)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cluster",
        choices=["real"],
        default="real",
        help="the real control plane (tests/controlplane), the only one there is",
    )
    parser.add_argument("--workers", type=int, default=1024)
    parser.add_argument("--jobs", type=int, default=100)
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(reason)
        return 1
    with (
        tempfile.TemporaryDirectory(prefix="controlplane-") as directory,
        ControlPlane(Path(directory)) as plane,
    ):
        identity = install_chart(plane)
        one_big_job(plane, identity, args.workers)
        if args.jobs:
            many_small_jobs(plane, identity, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
