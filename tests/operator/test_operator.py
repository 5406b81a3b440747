"""The operator end to end against the real control plane: kopf handlers, reconcile, the
Kubernetes backend, as the chart's ServiceAccount, with the real scheduler placing pods on the
test kubelet's nodes (``tests/support/kubelet.py``) and the real garbage collector."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from pretrain_operator.api import JobStatus
from pretrain_operator.kube.client import KubeClient, TemporaryApiError
from pretrain_operator.kube.reconcile import reconcile
from pretrain_trainer.metrics import Health, TrainerMetrics, serve

from tests.operator.conftest import GROUP, PLURAL, VERSION, Operator, job, running_operator
from tests.support.controlplane import ControlPlane
from tests.support.fixtures import Identity
from tests.support.kubelet import Kubelet, names


def jobs(kube: Kubelet) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{kube.namespace}/{PLURAL}"


def create(kube: Kubelet, body: dict[str, Any]) -> None:
    body["metadata"]["namespace"] = kube.namespace
    kube.client.request("POST", jobs(kube), body=body)


def patch_spec(kube: Kubelet, name: str, spec: dict[str, Any]) -> None:
    kube.client.request(
        "PATCH",
        f"{jobs(kube)}/{name}",
        body={"spec": spec},
        content_type="application/merge-patch+json",
    )


def status(kube: Kubelet, name: str = "demo") -> dict[str, Any]:
    body = kube.client.get_job(kube.namespace, name)
    return (body or {}).get("status") or {}


def live(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods not being deleted (those on a node that went away stay Terminating: no kubelet is
    left to confirm their deletion)."""
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def workers(kube: Kubelet, *, phase: str | None = None) -> list[str]:
    return sorted(
        p["metadata"]["name"]
        for p in kube.pods("worker")
        if phase is None or p.get("status", {}).get("phase") == phase
    )


def attempts(kube: Kubelet) -> dict[int, list[str]]:
    return kube.attempts()


def attempt(kube: Kubelet, number: int, size: int = 2) -> list[str]:
    return kube.attempt(number, size)


def uids(kube: Kubelet, pods: list[str]) -> list[str]:
    return [kube.pod(name)["metadata"]["uid"] for name in pods]


def report(stage: int, *, step: int = 10) -> dict[str, Any]:
    return {
        "finished": True,
        "stage": stage,
        "step": step,
        "tokens": step * 256,
        "loss": 2.5,
        "checkpoint": f"/ckpt/demo/stage-{stage}/step-{step}",
    }


def test_a_new_job_gets_its_service_config_rendezvous_and_workers(
    kube: Kubelet, operator: Operator, agents: bool
) -> None:
    with operator():
        create(kube, job())
        first = kube.eventually(lambda: attempt(kube, 1), what="2 workers")
        kube.eventually(lambda: status(kube).get("workers", {}).get("ready") == 2, what="ready")
    uid = kube.client.get_job(kube.namespace, "demo")["metadata"]["uid"]  # type: ignore[index]
    assert names(kube.objects("services")) == ["demo"]
    # What the control plane puts in every namespace, and what the operator created.
    assert names(kube.objects("configmaps")) == ["demo-config", "kube-root-ca.crt"]
    assert names(kube.objects("serviceaccounts")) == ["default", "demo-worker"]
    assert names(kube.pods("rendezvous")) == ["demo-rdzv"]
    # maxWorkers is 3, but a global batch of 4 trains no faster on 3 than on 2 (the longest
    # rank runs 2 micro-batches either way): no standby waits for slot 2.
    assert kube.pods("standby") == []
    for pod in kube.pods():
        assert pod["metadata"]["ownerReferences"][0]["uid"] == uid
    assert first == (["demo-w0", "demo-w1"] if agents else ["demo-a1-w0", "demo-a1-w1"])
    worker = kube.pod(first[1])
    labels = worker["metadata"]["labels"]
    assert (labels["pretrain.dev/stage"], labels["pretrain.dev/attempt"]) == ("0", "1")
    assert (labels["pretrain.dev/slot"], labels["pretrain.dev/rank"]) == ("1", "1")
    container = worker["spec"]["containers"][0]
    store = f"demo-rdzv.demo.{kube.namespace}.svc:29400"
    if agents:  # the agent was told its place in the group; the group meets in the store
        (order,) = kube.agents[first[1]].orders
        assert (order.attempt, order.stage, order.rank, order.workers) == (1, 0, 1, 2)
        assert {"name": "PRETRAIN_STORE", "value": store} in container["env"]
    else:
        assert "--nnodes=2" in container["command"]
        assert f"--rdzv-endpoint={store}" in container["command"]
    assert worker["spec"]["nodeName"] != kube.pod(first[0])["spec"]["nodeName"]
    current = status(kube)
    assert current["workers"] == {
        "desired": 2,
        "ready": 2,
        "slots": [0, 1],
        # 4 sequences in micro-batches of 1 over 2 ranks: 2 each.
        "microBatches": {"most": 2, "fewest": 2, "efficiency": 1},
    }
    assert current["stage"]["name"] == "s0"
    assert current["observedGeneration"] == 1
    reasons = [e["reason"] for e in kube.objects("events")]
    assert "Created" in reasons
    stored = kube.objects(PLURAL)[0]
    assert stored["metadata"]["finalizers"] == ["pretrain.dev/finalizer"]
    assert not [k for k in stored["metadata"].get("annotations", {}) if "kopf" in k]
    assert set(current) <= set(JobStatus.model_fields) | {  # no handler results in status
        f.alias for f in JobStatus.model_fields.values() if f.alias
    }


def reasons(kube: Kubelet) -> list[str]:
    return [e["reason"] for e in kube.objects("events")]


def test_a_failed_worker_restarts_the_group_as_a_new_attempt(
    kube: Kubelet, operator: Operator, agents: bool
) -> None:
    with operator():
        create(kube, job())
        first = kube.eventually(lambda: attempt(kube, 1))
        before = uids(kube, first)
        kube.finish(first[1], exit_code=1, report={"finished": False, "exitCode": 75})
        second = kube.eventually(lambda: attempt(kube, 2), what="attempt 2")
        kube.eventually(lambda: status(kube).get("phase") == "Running")
    current = status(kube)
    assert current["attempt"] == 2
    assert current["restarts"] == {"total": 1, "byReason": {"WorkerFailed": 1}}
    assert "WorkerFailed" in reasons(kube)
    assert 1 not in attempts(kube)  # the old attempt is gone
    if agents:  # on the same pods: no pod was created for the restart
        assert uids(kube, second) == before
    else:
        assert set(uids(kube, second)).isdisjoint(before)


def test_a_node_going_not_ready_shrinks_the_group_and_its_return_grows_it(
    kube: Kubelet, operator: Operator
) -> None:
    with operator():
        create(kube, job())
        first = kube.eventually(lambda: attempt(kube, 1))
        node = kube.pod(first[0])["spec"]["nodeName"]
        kube.node_not_ready(node)  # the node that hosts rank 0
        kube.eventually(lambda: attempt(kube, 2, size=1), what="shrunk to 1")
        moved = kube.eventually(
            lambda: [p for p in live(kube.pods("rendezvous")) if p["spec"].get("nodeName")],
            what="rendezvous pod placed",
        )
        assert moved[0]["spec"]["nodeName"] != node  # its store went down with the node
        lost = status(kube)
        assert lost["restarts"]["byReason"] == {"WorkerLost": 1}
        assert f"node {node} not ready" in " ".join(e["message"] for e in kube.objects("events"))
        kube.add_node()  # capacity is back: a standby runs there, the group grows
        kube.eventually(lambda: attempt(kube, 3), what="grown to 2")
        grown = status(kube)
    assert grown["workers"]["desired"] == 2
    assert grown["restarts"]["byReason"] == {"WorkerLost": 1, "Resized": 1}
    # events are posted after the status is written (docs/design.md, "Reconcile"): wait for it
    kube.eventually(lambda: "Resized" in reasons(kube), what="the Resized event")


def test_stage_reports_move_to_the_next_stage_and_the_last_succeeds_and_cleans_up(
    kube: Kubelet, operator: Operator
) -> None:
    with operator():
        create(kube, job())
        first = kube.eventually(lambda: attempt(kube, 1))
        for pod in first:
            kube.finish(pod, exit_code=0, report=report(0))
        second = kube.eventually(lambda: attempt(kube, 2), what="stage 1")
        assert kube.pod(second[0])["metadata"]["labels"]["pretrain.dev/stage"] == "1"
        # Written after the pass's orders, which an agent may have started already.
        kube.eventually(lambda: status(kube)["stage"]["name"] == "s1", what="status of stage 1")
        for pod in second:
            kube.finish(pod, exit_code=0, report=report(1, step=20))
        kube.eventually(lambda: status(kube).get("phase") == "Succeeded", what="Succeeded")
        kube.eventually(lambda: kube.pods() == [], what="pods cleaned up")
    done = status(kube)
    assert [(s["name"], s["step"]) for s in done["stages"]] == [("s0", 10), ("s1", 20)]
    assert done["stages"][1]["checkpoint"] == "/ckpt/demo/stage-1/step-20"
    assert reasons(kube).count("StageCompleted") == 2
    assert "Succeeded" in reasons(kube)


def test_more_failures_than_max_restarts_fail_the_job(kube: Kubelet, operator: Operator) -> None:
    body = job()
    body["spec"]["elastic"]["maxRestarts"] = 1
    with operator():
        create(kube, body)
        for number in (1, 2):
            group = kube.eventually(lambda n=number: attempt(kube, n), what=f"a{number}")  # type: ignore[misc]
            kube.finish(group[0], exit_code=1)
        kube.eventually(lambda: status(kube).get("phase") == "Failed", what="Failed")
        kube.eventually(lambda: kube.pods() == [], what="pods removed")
    failed = next(c for c in status(kube)["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "RestartLimitExceeded"
    assert "more than maxRestarts (1)" in failed["message"]


def test_a_permanent_trainer_error_fails_the_job_with_its_message(
    kube: Kubelet, operator: Operator
) -> None:
    error = "data source 'web': no shards under /data/web"
    with operator():
        create(kube, job())
        first = kube.eventually(lambda: attempt(kube, 1))
        kube.finish(
            first[0], exit_code=1, report={"finished": False, "exitCode": 78, "error": error}
        )
        kube.eventually(lambda: status(kube).get("phase") == "Failed", what="Failed")
    failed = next(c for c in status(kube)["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"]) == (
        "PermanentError",
        f"the trainer reported a permanent error: {error}",
    )
    assert status(kube)["restarts"]["total"] == 0


def test_suspend_removes_every_pod_and_resume_starts_a_new_attempt(
    kube: Kubelet, operator: Operator
) -> None:
    with operator():
        create(kube, job())
        kube.eventually(lambda: attempt(kube, 1))
        patch_spec(kube, "demo", {"suspend": True})
        kube.eventually(lambda: status(kube).get("phase") == "Suspended", what="Suspended")
        kube.eventually(lambda: kube.pods() == [], what="no pods while suspended")
        assert "demo-config" in names(kube.objects("configmaps"))
        patch_spec(kube, "demo", {"suspend": False})
        # A new attempt runs: at once on both nodes, or (when the standbys asking for them
        # come up slower than the scale-up cool-down, as on a busy machine) on one, then two.
        kube.eventually(lambda: set(attempts(kube)) - {1}, what="resumed")
    assert "Suspended" in reasons(kube)
    assert "Resumed" in reasons(kube)
    # A suspension is not a failure (a resize after a one-worker resume may follow).
    assert set(status(kube)["restarts"].get("byReason", {})) <= {"Resized"}


def test_deleting_the_job_deletes_everything_it_owns(kube: Kubelet, operator: Operator) -> None:
    with operator():
        create(kube, job())
        kube.eventually(lambda: attempt(kube, 1))
        kube.client.request("DELETE", f"{jobs(kube)}/demo")
        kube.eventually(lambda: kube.objects(PLURAL) == [], what="job gone (finalizer removed)")
        # The operator deletes nothing itself: the garbage collector follows ownerReferences.
        kube.eventually(lambda: kube.pods() == [], what="pods collected")
        kube.eventually(lambda: kube.objects("services") == [], what="service collected")
    assert names(kube.objects("configmaps")) == ["kube-root-ca.crt"]
    assert names(kube.objects("serviceaccounts")) == ["default"]


def test_a_spec_that_slipped_past_the_schema_gets_invalid_spec_and_others_still_run(
    kube: Kubelet, operator: Operator
) -> None:
    broken = job("broken")
    broken["spec"]["stages"][0]["globalBatchSize"] = 3  # micro batches of 2 cannot make 3
    broken["spec"]["stages"][0]["microBatchSize"] = 2
    broken["spec"]["stages"][1]["dataMix"] = {"nowhere": 1}
    with operator():
        create(kube, broken)
        create(kube, job())
        kube.eventually(lambda: status(kube, "broken").get("phase") == "Failed", what="Failed")
        kube.eventually(lambda: attempt(kube, 1), what="demo runs")
    failed = status(kube, "broken")["conditions"][0]
    assert failed["reason"] == "InvalidSpec"
    assert "spec.stages[0].globalBatchSize" in failed["message"]
    assert "spec.stages[1].dataMix.nowhere" in failed["message"]
    assert [p for p in kube.pods() if p["metadata"]["labels"]["pretrain.dev/job"] == "broken"] == []


def snapshot(kube: Kubelet) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    pods = sorted((p["metadata"]["name"], p["metadata"]["uid"]) for p in kube.pods())
    current = status(kube)
    return pods, {k: current.get(k) for k in ("phase", "attempt", "restarts", "workers", "stage")}


def test_restarting_the_operator_in_any_phase_duplicates_nothing_and_keeps_status(
    kube: Kubelet, operator: Operator
) -> None:
    def restart_changes_nothing() -> None:
        before = snapshot(kube)
        with operator():
            time.sleep(2.5)  # two resyncs, and every watch replayed from the start
        assert snapshot(kube) == before

    with operator():
        create(kube, job())
        kube.eventually(lambda: attempt(kube, 1), what="Running")
        kube.eventually(lambda: status(kube).get("workers", {}).get("ready") == 2, what="ready")
    restart_changes_nothing()  # Running

    with operator():
        for node in kube.ready_nodes():
            kube.node_not_ready(node)
        kube.eventually(lambda: "WaitingForWorkers" in str(status(kube)), what="waiting")
    restart_changes_nothing()  # Restarting, waiting for capacity

    with operator():
        patch_spec(kube, "demo", {"suspend": True})
        kube.eventually(lambda: status(kube).get("phase") == "Suspended")
        kube.eventually(lambda: live(kube.pods()) == [], what="no pods but the lost nodes'")
    restart_changes_nothing()  # Suspended

    kube.add_node()
    kube.add_node()
    with operator():
        patch_spec(kube, "demo", {"suspend": False})
        group = kube.eventually(lambda: attempt(kube, 2), what="resumed")
        for pod in group:
            kube.finish(pod, exit_code=0, report=report(0))
        group = kube.eventually(lambda: attempt(kube, 3), what="stage 1")
        kube.eventually(lambda: status(kube)["workers"].get("ready") == 2, what="ready")
        restarts = status(kube)["restarts"]
    restart_changes_nothing()  # Running the second stage
    with operator():
        for pod in group:
            kube.finish(pod, exit_code=0, report=report(1))
        kube.eventually(lambda: status(kube).get("phase") == "Succeeded")
        kube.eventually(lambda: kube.pods() == [], what="pods gone")  # agents' pods still ran
    restart_changes_nothing()  # Succeeded
    assert status(kube)["restarts"] == restarts  # restarts of the operator are not the job's


class FailingClient(KubeClient):
    """The API server refuses the first create of one pod: an operator dying half-way."""

    def __init__(self, api: Any, *, fail: str) -> None:
        super().__init__(api)
        self.fail: str | None = fail

    def create(self, obj: Any, *, namespace: str) -> dict[str, Any] | None:
        if obj["kind"] == "Pod" and obj["metadata"]["name"] == self.fail:
            self.fail = None
            raise TemporaryApiError(503, "the server is shutting down")
        return super().create(obj, namespace=namespace)


def test_a_reconcile_that_died_half_way_is_completed_by_the_next_without_duplicates(
    kube: Kubelet, controlplane: ControlPlane, operator_identity: Identity
) -> None:
    create(kube, job())
    failing = FailingClient(controlplane.client(operator_identity.token), fail="demo-w1")

    def once(client: KubeClient) -> None:
        body = client.get_job(kube.namespace, "demo")
        assert body is not None
        reconcile(client, body, now=datetime.now(UTC))

    kube.eventually(lambda: (once(failing), len(kube.pods("standby")) == 2)[1])
    kube.eventually(
        lambda: len([p for p in kube.pods("standby") if p["spec"].get("nodeName")]) == 2
    )

    def dies_half_way() -> bool:
        """A pass that creates the group: worker 0, then it dies creating worker 1."""
        try:
            once(failing)
        except TemporaryApiError:
            return True
        assert workers(kube) == []  # a pass that did not reach the group created none of it
        return False

    # The standbys may not be seen Running yet: the passes before that wait and create nothing.
    kube.eventually(dies_half_way, what="the pass that dies half-way")
    assert failing.fail is None
    assert workers(kube) == ["demo-w0"]
    assert len(kube.pods("standby")) == 2  # a standby yields only once every worker exists
    first = kube.pod("demo-w0")["metadata"]["uid"]
    assert status(kube).get("attempt", 0) == 0
    # The next passes decide the same attempt again: worker 0 exists (409, fine), 1 is created.
    kube.eventually(lambda: (once(failing), attempt(kube, 1))[1], what="attempt 1")
    assert workers(kube) == ["demo-w0", "demo-w1"]
    assert kube.pod("demo-w0")["metadata"]["uid"] == first
    assert status(kube)["attempt"] == 1
    assert reasons(kube).count("Created") == 1


def test_kubectl_apply_starts_a_job_and_kubectl_shows_its_pods_and_columns(
    kube: Kubelet, operator: Operator, controlplane: ControlPlane, tmp_path: Path, agents: bool
) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(job("from-kubectl", namespace=kube.namespace)))

    def kubectl(*args: str) -> str:
        return controlplane.kubectl(*args, f"--namespace={kube.namespace}").stdout

    with operator():
        # Validated against the CRD's schema, as published by the API server.
        assert "created" in kubectl("apply", "--validate=strict", "-f", str(manifest))
        kube.eventually(lambda: len(kube.pods("worker")) == 2, what="workers")
        listed = kubectl("get", "pods", "-l", "pretrain.dev/role=worker", "-o", "name")
        pods = ["w0", "w1"] if agents else ["a1-w0", "a1-w1"]
        assert sorted(listed.split()) == [f"pod/from-kubectl-{p}" for p in pods]
        shown = json.loads(kubectl("get", "ptj", "from-kubectl", "-o", "json"))
        assert shown["status"]["stage"]["name"] == "s0"
        kube.eventually(lambda: "Running" in kubectl("get", "ptj"), what="phase column")
        table = kubectl("get", "ptj", "-o", "wide").splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:3] == ["NAME", "PHASE", "STAGE"], header
    assert row[:3] == ["from-kubectl", "Running", "s0"], row


class CountingClient(KubeClient):
    """Counts every API request one operator replica makes."""

    made: Counter[str] = Counter()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        CountingClient.made[self.replica] += 1
        return super().request(method, path, **kwargs)

    def __init__(self, api: Any, *, replica: str) -> None:
        super().__init__(api)
        self.replica = replica


def test_of_two_peered_replicas_only_the_one_with_the_highest_priority_acts(
    kube: Kubelet, controlplane: ControlPlane, operator_identity: Identity
) -> None:
    # As the chart deploys them: every namespace, peering through its ClusterKopfPeering.
    CountingClient.made.clear()

    def replica(name: str, priority: int) -> contextlib.AbstractContextManager[KopfRunner]:
        return running_operator(
            controlplane,
            operator_identity,
            None,
            client=lambda api: CountingClient(api, replica=name),
            args=(f"--peering={operator_identity.service_account}", f"--priority={priority}"),
            standalone=False,
            peering=operator_identity.service_account,
        )

    with replica("first", 100), replica("second", 50):
        time.sleep(3)  # the peers see each other; the lower one pauses
        create(kube, job())
        kube.eventually(lambda: attempt(kube, 1), what="Running")
        kube.eventually(lambda: status(kube).get("phase") == "Running")
    assert CountingClient.made["first"] > 0, dict(CountingClient.made)
    assert CountingClient.made["second"] == 0, dict(CountingClient.made)
    assert reasons(kube).count("Created") == 1


def test_a_running_jobs_status_shows_the_trainers_progress_and_an_eta(
    kube: Kubelet, operator: Operator
) -> None:
    # What rank 0's trainer serves in its pod: the real metrics and endpoint, mid-stage.
    trainer = TrainerMetrics(namespace=kube.namespace, job="demo", stage="s0")
    trainer.step.set(4)
    trainer.stage_tokens.set(4 * 256)
    trainer.loss.set(2.75)
    for _ in range(4):
        trainer.step_seconds.observe(0.5)
    server = serve(port=0, metrics=trainer, health=Health(step_timeout=60))
    try:
        port = server.server_address[1]
        with operator(trainer_metrics_port=port, progress_seconds=1.0):
            create(kube, job())
            kube.eventually(lambda: status(kube).get("step") == 4, what="progress")
    finally:
        server.shutdown()
    current = status(kube)
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
    kube: Kubelet, controlplane: ControlPlane, operator_identity: Identity
) -> None:
    from pretrain_operator.telemetry.progress import TrainerProgress

    create(kube, job())
    client = StatusWrites(controlplane.client(operator_identity.token))
    read = TrainerProgress(stage=0, step=3, tokens=768, loss=2.5, seconds_per_step=0.5)
    passes: list[tuple[str | None, int, int | None]] = []  # phase, status writes, step shown

    def once(*, progress: bool = True) -> bool:
        body = client.get_job(kube.namespace, "demo")
        assert body is not None
        before = client.patches
        reader = (lambda pods, attempt: read) if progress else None
        reconcile(client, body, now=datetime.now(UTC), progress=reader)
        written = status(kube)
        passes.append((written.get("phase"), client.patches - before, written.get("step")))
        return written.get("phase") == "Running"

    kube.eventually(once, what="a running job")
    assert max(writes for _, writes, _ in passes) == 1, passes
    # The pass that saw the workers run wrote the phase and the progress together.
    assert passes[-1] == ("Running", 1, 3)
    assert passes[-2][0] != "Running"
    current = status(kube)
    assert (current["tokens"], current["loss"]) == (768, 2.5)
    # Once the cluster settles, a pass that changes nothing writes nothing.
    kube.eventually(lambda: once(progress=False) and passes[-1][1] == 0, what="no write")
    assert max(writes for _, writes, _ in passes) == 1, passes


def test_the_scheduler_preempts_a_standby_for_any_other_pod_and_the_job_runs_on(
    kube: Kubelet, operator: Operator
) -> None:
    body = job()
    body["spec"]["elastic"]["maxWorkers"] = 4  # a batch of 4 runs on 1, 2 or 4 workers
    kube.add_node()  # 3 nodes: 2 workers, and a standby holding the third
    with operator():
        create(kube, body)
        group = kube.eventually(lambda: attempt(kube, 1), what="2 workers")  # any 2 slots
        idle = kube.eventually(
            lambda: [
                p for p in kube.pods("standby") if p.get("status", {}).get("phase") == "Running"
            ],
            what="a standby running",
        )[0]
        assert idle["spec"]["priorityClassName"] == "pretrain-standby"
        # Another team's pod, at the default priority, wants a whole node.
        other = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "other-team"},
            "spec": {
                "securityContext": {
                    "runAsNonRoot": True,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "main",
                        "image": "busybox",
                        "resources": {"limits": {"nvidia.com/gpu": 8}},
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
        kube.client.request("POST", f"/api/v1/namespaces/{kube.namespace}/pods", body=other)
        placed = kube.eventually(
            lambda: kube.pod("other-team")["spec"].get("nodeName"), what="the other pod placed"
        )
        assert placed == idle["spec"]["nodeName"]  # where the standby was
        kube.eventually(
            lambda: idle["metadata"]["uid"] not in [p["metadata"]["uid"] for p in kube.pods()],
            what="the standby preempted",
        )
        time.sleep(2)  # a few passes: the job must not restart for it
        assert attempt(kube, 1) == group
        current = status(kube)
    assert current["phase"] == "Running"
    assert current["restarts"]["total"] == 0
    assert current["attempt"] == 1


def test_the_operator_rides_out_an_api_server_restart_and_watches_gone_stale(
    kube: Kubelet, operator: Operator, controlplane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kopf")
    with operator():
        create(kube, job())
        first = kube.eventually(lambda: attempt(kube, 1), what="2 workers")
        kube.eventually(lambda: status(kube).get("workers", {}).get("ready") == 2, what="ready")
        before = snapshot(kube)
        # Killed, etcd compacted meanwhile, back on the same etcd: the operator's watches
        # resume from resourceVersions that are gone (410) and must list again.
        controlplane.restart_apiserver(compact=True)
        time.sleep(3)  # passes after the restart, from relisted caches
        assert snapshot(kube) == before  # nothing created twice, nothing lost from status
        kube.finish(first[1], exit_code=1, report={"finished": False, "exitCode": 75})
        kube.eventually(lambda: attempt(kube, 2), timeout=60, what="attempt 2 after the restart")
        kube.eventually(lambda: status(kube).get("phase") == "Running", what="Running")
    relisted = [r for r in caplog.records if "Restarting the watch-stream" in r.getMessage()]
    assert relisted, "no watch got 410 Gone"
    assert status(kube)["restarts"]["byReason"] == {"WorkerFailed": 1}
    assert reasons(kube).count("Created") == 1
