"""The operator end to end against an API server: kopf handlers, reconcile, the Kubernetes
backend, with the tests playing scheduler and kubelets (``cluster.py``)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kopf.testing import KopfRunner
from pretrain_operator.api import JobStatus
from pretrain_operator.kube.client import KubeClient, TemporaryApiError
from pretrain_operator.kube.handlers import register
from pretrain_operator.kube.reconcile import reconcile
from pretrain_operator.kube.settings import OperatorSettings
from pretrain_trainer.metrics import Health, TrainerMetrics, serve

from tests.operator.conftest import GROUP, PLURAL, VERSION, job, running_operator
from tests.support.cluster import Cluster
from tests.support.kube.apiserver import ApiServer, kopf_login

JOBS = f"/apis/{GROUP}/{VERSION}/namespaces/default/{PLURAL}"


def create(cluster: Cluster, body: dict[str, Any]) -> None:
    cluster.client.request("POST", JOBS, body=body)


def patch_spec(cluster: Cluster, name: str, spec: dict[str, Any]) -> None:
    cluster.client.request(
        "PATCH", f"{JOBS}/{name}", body={"spec": spec}, content_type="application/merge-patch+json"
    )


def status(cluster: Cluster, name: str = "demo") -> dict[str, Any]:
    body = cluster.client.get_job("default", name)
    return (body or {}).get("status") or {}


def workers(cluster: Cluster, *, phase: str | None = None) -> list[str]:
    return sorted(
        p["metadata"]["name"]
        for p in cluster.pods("worker")
        if phase is None or p.get("status", {}).get("phase") == phase
    )


def running(cluster: Cluster, *names: str) -> bool:
    return workers(cluster, phase="Running") == sorted(names)


def attempt(cluster: Cluster, number: int, size: int = 2) -> list[str]:
    """The Running workers of attempt ``number`` once there are ``size`` of them, else []."""
    names = [n for n in workers(cluster, phase="Running") if f"-a{number}-" in n]
    return names if len(names) == size else []


def report(stage: int, *, step: int = 10) -> dict[str, Any]:
    return {
        "finished": True,
        "stage": stage,
        "step": step,
        "tokens": step * 256,
        "loss": 2.5,
        "checkpoint": f"/ckpt/demo/stage-{stage}/step-{step}",
    }


def names(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects)


def test_a_new_job_gets_its_service_config_rendezvous_and_workers(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"), what="2 workers")
        cluster.eventually(lambda: status(cluster).get("phase") == "Running", what="Running")
    uid = cluster.client.get_job("default", "demo")["metadata"]["uid"]  # type: ignore[index]
    assert names(apiserver.objects("services", "default")) == ["demo"]
    assert names(apiserver.objects("configmaps", "default")) == ["demo-config"]
    assert names(apiserver.objects("serviceaccounts", "default")) == ["demo-worker"]
    assert names(cluster.pods("rendezvous")) == ["demo-rdzv"]
    # maxWorkers is 3, but a global batch of 4 never runs on 3: no standby waits for slot 2.
    assert cluster.pods("standby") == []
    for pod in cluster.pods():
        assert pod["metadata"]["ownerReferences"][0]["uid"] == uid
    worker = cluster.pod("demo-a1-w1")
    labels = worker["metadata"]["labels"]
    assert (labels["pretrain.dev/stage"], labels["pretrain.dev/attempt"]) == ("0", "1")
    assert (labels["pretrain.dev/slot"], labels["pretrain.dev/rank"]) == ("1", "1")
    command = worker["spec"]["containers"][0]["command"]
    assert "--nnodes=2" in command
    assert "--rdzv-endpoint=demo-rdzv.demo.default.svc:29400" in command
    current = status(cluster)
    assert current["workers"] == {"desired": 2, "ready": 2, "slots": [0, 1]}
    assert current["stage"]["name"] == "s0"
    assert current["observedGeneration"] == 1
    reasons = [e["reason"] for e in apiserver.objects("events", "default")]
    assert "Created" in reasons
    stored = apiserver.objects(PLURAL)[0]
    assert stored["metadata"]["finalizers"] == ["pretrain.dev/finalizer"]
    assert not [k for k in stored["metadata"].get("annotations", {}) if "kopf" in k]
    assert set(current) <= set(JobStatus.model_fields) | {  # no handler results in status
        f.alias for f in JobStatus.model_fields.values() if f.alias
    }


def reasons(apiserver: ApiServer) -> list[str]:
    return [e["reason"] for e in apiserver.objects("events", "default")]


def test_a_failed_worker_restarts_the_group_as_a_new_attempt(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"))
        cluster.finish("demo-a1-w1", exit_code=1, report={"finished": False, "exitCode": 75})
        cluster.eventually(lambda: attempt(cluster, 2), what="attempt 2")
        cluster.eventually(lambda: status(cluster).get("phase") == "Running")
    current = status(cluster)
    assert current["attempt"] == 2
    assert current["restarts"] == {"total": 1, "byReason": {"WorkerFailed": 1}}
    assert "WorkerFailed" in reasons(apiserver)
    assert [n for n in workers(cluster) if "-a1-" in n] == []  # the old attempt is gone


def test_a_node_going_not_ready_shrinks_the_group_and_its_return_grows_it(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"))
        node = cluster.pod("demo-a1-w0")["spec"]["nodeName"]
        cluster.node_not_ready(node)  # the node that hosts rank 0
        cluster.eventually(lambda: attempt(cluster, 2, size=1), what="shrunk to 1")
        moved = cluster.eventually(
            lambda: [p for p in cluster.pods("rendezvous") if p["spec"].get("nodeName")],
            what="rendezvous pod placed",
        )
        assert moved[0]["spec"]["nodeName"] != node  # its store went down with the node
        lost = status(cluster)
        assert lost["restarts"]["byReason"] == {"WorkerLost": 1}
        assert f"node {node} not ready" in " ".join(
            e["message"] for e in apiserver.objects("events", "default")
        )
        cluster.add_node()  # capacity is back: a standby runs there, the group grows
        cluster.eventually(lambda: attempt(cluster, 3), what="grown to 2")
        grown = status(cluster)
    assert grown["workers"]["desired"] == 2
    assert grown["restarts"]["byReason"] == {"WorkerLost": 1, "Resized": 1}
    assert "Resized" in reasons(apiserver)


def test_stage_reports_move_to_the_next_stage_and_the_last_succeeds_and_cleans_up(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"))
        for pod in ("demo-a1-w0", "demo-a1-w1"):
            cluster.finish(pod, exit_code=0, report=report(0))
        second = cluster.eventually(lambda: attempt(cluster, 2), what="stage 1")
        assert cluster.pod(second[0])["metadata"]["labels"]["pretrain.dev/stage"] == "1"
        assert status(cluster)["stage"]["name"] == "s1"
        for pod in second:
            cluster.finish(pod, exit_code=0, report=report(1, step=20))
        cluster.eventually(lambda: status(cluster).get("phase") == "Succeeded", what="Succeeded")
        cluster.eventually(lambda: cluster.pods() == [], what="pods cleaned up")
    done = status(cluster)
    assert [(s["name"], s["step"]) for s in done["stages"]] == [("s0", 10), ("s1", 20)]
    assert done["stages"][1]["checkpoint"] == "/ckpt/demo/stage-1/step-20"
    assert reasons(apiserver).count("StageCompleted") == 2
    assert "Succeeded" in reasons(apiserver)


def test_more_failures_than_max_restarts_fail_the_job(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    body = job()
    body["spec"]["elastic"]["maxRestarts"] = 1
    with running_operator(apiserver):
        create(cluster, body)
        for number in (1, 2):
            group = cluster.eventually(lambda n=number: attempt(cluster, n), what=f"a{number}")  # type: ignore[misc]
            cluster.finish(group[0], exit_code=1)
        cluster.eventually(lambda: status(cluster).get("phase") == "Failed", what="Failed")
        cluster.eventually(lambda: cluster.pods() == [], what="pods removed")
    failed = next(c for c in status(cluster)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RestartLimitExceeded"
    assert "more than maxRestarts (1)" in failed["message"]


def test_a_permanent_trainer_error_fails_the_job_with_its_message(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    error = "data source 'web': no shards under /data/web"
    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"))
        cluster.finish(
            "demo-a1-w0", exit_code=1, report={"finished": False, "exitCode": 78, "error": error}
        )
        cluster.eventually(lambda: status(cluster).get("phase") == "Failed", what="Failed")
    failed = next(c for c in status(cluster)["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"]) == (
        "PermanentError",
        f"the trainer reported a permanent error: {error}",
    )
    assert status(cluster)["restarts"]["total"] == 0


def test_suspend_removes_every_pod_and_resume_starts_a_new_attempt(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"))
        patch_spec(cluster, "demo", {"suspend": True})
        cluster.eventually(lambda: status(cluster).get("phase") == "Suspended", what="Suspended")
        cluster.eventually(lambda: cluster.pods() == [], what="no pods while suspended")
        assert names(apiserver.objects("configmaps", "default")) == ["demo-config"]
        patch_spec(cluster, "demo", {"suspend": False})
        cluster.eventually(lambda: attempt(cluster, 2), what="resumed")
    assert "Suspended" in reasons(apiserver)
    assert "Resumed" in reasons(apiserver)
    assert status(cluster)["restarts"]["total"] == 0  # a suspension is not a failure


def test_deleting_the_job_deletes_everything_it_owns(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"))
        cluster.client.request("DELETE", f"{JOBS}/demo")
        cluster.eventually(
            lambda: apiserver.objects(PLURAL) == [], what="job gone (finalizer removed)"
        )
        cluster.eventually(lambda: cluster.pods() == [], what="pods collected")
    for kind in ("services", "configmaps", "serviceaccounts"):
        assert apiserver.objects(kind, "default") == []


def test_a_spec_that_slipped_past_the_schema_gets_invalid_spec_and_others_still_run(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    broken = job("broken")
    broken["spec"]["stages"][0]["globalBatchSize"] = 3  # micro batches of 2 cannot make 3
    broken["spec"]["stages"][0]["microBatchSize"] = 2
    broken["spec"]["stages"][1]["dataMix"] = {"nowhere": 1}
    with running_operator(apiserver):
        create(cluster, broken)
        create(cluster, job())
        cluster.eventually(
            lambda: status(cluster, "broken").get("phase") == "Failed", what="Failed"
        )
        cluster.eventually(lambda: running(cluster, "demo-a1-w0", "demo-a1-w1"), what="demo runs")
    failed = status(cluster, "broken")["conditions"][0]
    assert failed["reason"] == "InvalidSpec"
    assert "spec.stages[0].globalBatchSize" in failed["message"]
    assert "spec.stages[1].dataMix.nowhere" in failed["message"]
    assert [
        p for p in cluster.pods() if p["metadata"]["labels"]["pretrain.dev/job"] == "broken"
    ] == []


def snapshot(cluster: Cluster) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    pods = sorted((p["metadata"]["name"], p["metadata"]["uid"]) for p in cluster.pods())
    current = status(cluster)
    return pods, {k: current.get(k) for k in ("phase", "attempt", "restarts", "workers", "stage")}


def test_restarting_the_operator_in_any_phase_duplicates_nothing_and_keeps_status(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    def restart_changes_nothing() -> None:
        before = snapshot(cluster)
        with running_operator(apiserver):
            time.sleep(2.5)  # two resyncs, and every watch replayed from the start
        assert snapshot(cluster) == before

    with running_operator(apiserver):
        create(cluster, job())
        cluster.eventually(lambda: attempt(cluster, 1), what="Running")
        cluster.eventually(lambda: status(cluster).get("phase") == "Running")
    restart_changes_nothing()  # Running

    with running_operator(apiserver):
        for node in cluster.ready_nodes():
            cluster.node_not_ready(node)
        cluster.eventually(lambda: "WaitingForWorkers" in str(status(cluster)), what="waiting")
    restart_changes_nothing()  # Restarting, waiting for capacity

    with running_operator(apiserver):
        patch_spec(cluster, "demo", {"suspend": True})
        cluster.eventually(lambda: status(cluster).get("phase") == "Suspended")
        cluster.eventually(lambda: cluster.pods() == [])
    restart_changes_nothing()  # Suspended

    cluster.add_node()
    cluster.add_node()
    with running_operator(apiserver):
        patch_spec(cluster, "demo", {"suspend": False})
        group = cluster.eventually(lambda: attempt(cluster, 2), what="resumed")
        for pod in group:
            cluster.finish(pod, exit_code=0, report=report(0))
        group = cluster.eventually(lambda: attempt(cluster, 3), what="stage 1")
        cluster.eventually(lambda: status(cluster)["workers"].get("ready") == 2, what="ready")
        restarts = status(cluster)["restarts"]
    restart_changes_nothing()  # Running the second stage
    with running_operator(apiserver):
        for pod in group:
            cluster.finish(pod, exit_code=0, report=report(1))
        cluster.eventually(lambda: status(cluster).get("phase") == "Succeeded")
    restart_changes_nothing()  # Succeeded
    assert status(cluster)["restarts"] == restarts  # restarts of the operator are not the job's


class FailingClient(KubeClient):
    """The API server refuses the n-th pod create: an operator dying half-way through."""

    def __init__(self, api: Any, *, fail_at: int) -> None:
        super().__init__(api)
        self.pod_creates, self.fail_at = 0, fail_at

    def create(self, obj: Any, *, namespace: str) -> dict[str, Any] | None:
        if obj["kind"] == "Pod" and obj["metadata"]["labels"]["pretrain.dev/role"] == "worker":
            self.pod_creates += 1
            if self.pod_creates == self.fail_at:
                raise TemporaryApiError(503, "the server is shutting down")
        return super().create(obj, namespace=namespace)


def test_a_reconcile_that_died_half_way_is_completed_by_the_next_without_duplicates(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    create(cluster, job())
    failing = FailingClient(apiserver.client(), fail_at=2)

    def once(client: KubeClient) -> None:
        body = client.get_job("default", "demo")
        assert body is not None
        reconcile(client, body, now=datetime.now(UTC))

    cluster.eventually(lambda: (once(failing), len(cluster.pods("standby")) == 2)[1])
    cluster.eventually(
        lambda: len([p for p in cluster.pods("standby") if p["spec"].get("nodeName")]) == 2
    )
    with pytest.raises(TemporaryApiError):
        once(failing)  # created worker 0, died creating worker 1: no status written
    assert workers(cluster) == ["demo-a1-w0"]
    first = cluster.pod("demo-a1-w0")["metadata"]["uid"]
    assert status(cluster).get("attempt", 0) == 0
    # The next passes decide the same attempt again: worker 0 exists (409, fine), 1 is created.
    cluster.eventually(lambda: (once(failing), attempt(cluster, 1))[1], what="attempt 1")
    assert workers(cluster) == ["demo-a1-w0", "demo-a1-w1"]
    assert cluster.pod("demo-a1-w0")["metadata"]["uid"] == first
    assert status(cluster)["attempt"] == 1
    assert reasons(apiserver).count("Created") == 1


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_apply_starts_a_job_and_kubectl_shows_its_pods(
    apiserver: ApiServer, cluster: Cluster, tmp_path: Path
) -> None:
    config = apiserver.kubeconfig(tmp_path / "kubeconfig")
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job("from-kubectl")))

    def kubectl(*args: str) -> str:
        done = subprocess.run(
            ["kubectl", f"--kubeconfig={config}", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    with running_operator(apiserver):
        # No OpenAPI documents on this server, so no client-side validation.
        assert "created" in kubectl("apply", "--validate=false", "-f", str(manifest))
        cluster.eventually(lambda: len(cluster.pods("worker")) == 2, what="workers")
        listed = kubectl("get", "pods", "-l", "pretrain.dev/role=worker", "-o", "name")
        assert sorted(listed.split()) == ["pod/from-kubectl-a1-w0", "pod/from-kubectl-a1-w1"]
        shown = json.loads(kubectl("get", "ptj", "from-kubectl", "-o", "json"))
        assert shown["status"]["stage"]["name"] == "s0"


class CountingClient(KubeClient):
    """Counts every API request one operator replica makes."""

    made: Counter[str] = Counter()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        CountingClient.made[self.replica] += 1
        return super().request(method, path, **kwargs)

    def __init__(self, api: Any, *, replica: str) -> None:
        super().__init__(api)
        self.replica = replica


@contextlib.contextmanager
def replica(server: ApiServer, name: str, *, priority: int) -> Iterator[KopfRunner]:
    registry = kopf.OperatorRegistry()
    kopf_login(server, registry=registry)
    settings = OperatorSettings(peering="pretrain-operator", namespaces=("default",))
    register(
        registry,
        settings=settings,
        make_client=lambda: CountingClient(server.client(), replica=name),
    )
    args = ["run", "--namespace=default", "--peering=pretrain-operator", f"--priority={priority}"]
    with KopfRunner(args, registry=registry, timeout=60) as runner:
        yield runner


def test_of_two_peered_replicas_only_the_one_with_the_highest_priority_acts(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    peering = {
        "apiVersion": "kopf.dev/v1",
        "kind": "KopfPeering",
        "metadata": {"name": "pretrain-operator", "namespace": "default"},
    }
    cluster.client.request(
        "POST", "/apis/kopf.dev/v1/namespaces/default/kopfpeerings", body=peering
    )
    CountingClient.made.clear()
    with replica(apiserver, "first", priority=100), replica(apiserver, "second", priority=50):
        time.sleep(3)  # the peers see each other; the lower one pauses
        create(cluster, job())
        cluster.eventually(lambda: attempt(cluster, 1), what="Running")
        cluster.eventually(lambda: status(cluster).get("phase") == "Running")
    assert CountingClient.made["first"] > 0, dict(CountingClient.made)
    assert CountingClient.made["second"] == 0, dict(CountingClient.made)
    assert reasons(apiserver).count("Created") == 1


def test_a_running_jobs_status_shows_the_trainers_progress_and_an_eta(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    # What rank 0's trainer serves in its pod: the real metrics and endpoint, mid-stage.
    trainer = TrainerMetrics(namespace="default", job="demo", stage="s0")
    trainer.step.set(4)
    trainer.stage_tokens.set(4 * 256)
    trainer.loss.set(2.75)
    for _ in range(4):
        trainer.step_seconds.observe(0.5)
    server = serve(port=0, metrics=trainer, health=Health(step_timeout=60))
    try:
        port = server.server_address[1]
        with running_operator(apiserver, trainer_metrics_port=port, progress_seconds=1.0):
            create(cluster, job())
            cluster.eventually(lambda: status(cluster).get("step") == 4, what="progress")
    finally:
        server.shutdown()
    current = status(cluster)
    assert (current["tokens"], current["loss"]) == (1024, 2.75)
    eta = datetime.fromisoformat(current["eta"].replace("Z", "+00:00"))
    left = (eta - datetime.now(UTC)).total_seconds()
    assert 0 < left <= (10 - 4) * 0.5 + 1  # 6 steps to go at 0.5 s a step


class StatusWrites(KubeClient):
    """Counts the status writes of each pass (what the API server's audit log would show)."""

    def __init__(self, api: Any) -> None:
        super().__init__(api)
        self.patches = 0

    def patch_job_status(self, namespace: str, name: str, status: Any) -> None:
        self.patches += 1
        super().patch_job_status(namespace, name, status)


def test_a_pass_writes_the_status_at_most_once_progress_included(
    apiserver: ApiServer, cluster: Cluster
) -> None:
    from pretrain_operator.telemetry.progress import TrainerProgress

    create(cluster, job())
    client = StatusWrites(apiserver.client())
    read = TrainerProgress(stage=0, step=3, tokens=768, loss=2.5, seconds_per_step=0.5)
    passes: list[tuple[str | None, int, int | None]] = []  # phase, status writes, step shown

    def once(*, progress: bool = True) -> bool:
        body = client.get_job("default", "demo")
        assert body is not None
        before = client.patches
        reader = (lambda pods, attempt: read) if progress else None
        reconcile(client, body, now=datetime.now(UTC), progress=reader)
        written = status(cluster)
        passes.append((written.get("phase"), client.patches - before, written.get("step")))
        return written.get("phase") == "Running"

    cluster.eventually(once, what="a running job")
    assert max(writes for _, writes, _ in passes) == 1, passes
    # The pass that saw the workers run wrote the phase and the progress together.
    assert passes[-1] == ("Running", 1, 3)
    assert passes[-2][0] != "Running"
    current = status(cluster)
    assert (current["tokens"], current["loss"]) == (768, 2.5)
    # Once the cluster settles, a pass that changes nothing writes nothing.
    cluster.eventually(lambda: once(progress=False) and passes[-1][1] == 0, what="no write")
    assert max(writes for _, writes, _ in passes) == 1, passes
