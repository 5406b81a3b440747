"""Jobs that really train on the real control plane (``tests/support/running.py`` runs each
pod's command) while the node of rank 0 dies and comes back.

With a pod per attempt running torchrun, the status then holds goodput with restart and
restore badput and the recovery in its eight phases, the operator's metrics say the same, and
a local run of the same job through the same trouble (warm worker agents restoring from the
survivors' memory) accounts the same way and loses less to the restart. With worker agents in
the pods (the default), the group restarts on the surviving pod, from its memory tier, and no
pod is created until the node is back."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pretrain_operator.api import JobStatus, Phase
from pretrain_operator.local.backend import read_capacity, write_capacity
from pretrain_operator.local.runner import run
from pretrain_operator.manifests import load_job
from pretrain_operator.telemetry.goodput import Goodput, goodput
from pretrain_operator.telemetry.metrics import JobSnapshot, OperatorMetrics
from pretrain_operator.telemetry.recovery import PHASES, TOTAL
from pretrain_trainer.data import build_stdlib_corpus
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT
from tests.operator.conftest import GROUP, PLURAL, VERSION, running_operator
from tests.support.controlplane import ControlPlane
from tests.support.fixtures import Identity
from tests.support.running import RunningKubelet

pytestmark = pytest.mark.slow
LOSE, BACK = (0, 25), (0, 45)  # (stage, step): after the checkpoint of step 20, and later


def tiny_job(tmp_path: Path) -> dict[str, Any]:
    """examples/tiny-cpu.yaml, two shorter stages, its paths absolute, a node per worker (a
    local run keeps its checkpoints in its own directory)."""
    body = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    spec = body["spec"]
    spec["stages"] = spec["stages"][:2]
    spec["stages"][0]["budget"] = {"steps": 60}
    spec["stages"][1]["budget"] = {"steps": 20}
    for source in [*spec["data"]["sources"], *spec["data"]["evalSources"]]:
        source["path"] = str(tmp_path / "data" / source["path"].removeprefix("data/"))
    spec["checkpoint"] = {"path": str(tmp_path / "checkpoints"), "intervalSteps": 10}
    spec["resources"] = {"limits": {"nvidia.com/gpu": 8}}
    body["metadata"] = {"name": "tiny-cpu"}
    return body


def last_step(log: Path) -> tuple[int, int]:
    try:
        record = json.loads(log.read_text().splitlines()[-1])
        return int(record["stage"]), int(record["step"])
    except (OSError, ValueError, IndexError):
        return -1, 0


def on_steps(
    log: Path, script: list[tuple[tuple[int, int], Callable[[], None]]], stop: threading.Event
) -> threading.Thread:
    """Runs each action once the step log reaches its (stage, step)."""

    def follow() -> None:
        for at, action in script:
            while not stop.is_set() and last_step(log) < at:
                time.sleep(0.05)
            if stop.is_set():
                return
            action()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread


def rank0_node(kube: RunningKubelet) -> str:
    pods = [
        p
        for p in kube.pods("worker")
        if p["metadata"]["labels"].get("pretrain.dev/rank") == "0"
        and p.get("status", {}).get("phase") == "Running"
        and not p["metadata"].get("deletionTimestamp")
    ]
    return str(pods[-1]["spec"]["nodeName"])


def on_the_cluster(
    kube: RunningKubelet,
    plane: ControlPlane,
    identity: Identity,
    body: dict[str, Any],
    *,
    lose_at: tuple[int, int] = LOSE,
    back: list[float] | None = None,
    **operator: Any,
) -> JobStatus:
    """Runs the job on the cluster, rank 0's node lost at ``lose_at`` and back at BACK (when:
    appended to ``back``)."""
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{kube.namespace}/{PLURAL}"
    lost: list[str] = []

    def lose() -> None:
        lost.append(rank0_node(kube))
        kube.node_not_ready(lost[0])

    def come_back() -> None:
        (back if back is not None else []).append(time.time())
        kube.node_back(lost[0])

    stop = threading.Event()
    settings = {"trainer_metrics_port": kube.metrics_port, "progress_seconds": 1.0, **operator}
    with running_operator(plane, identity, kube.namespace, **settings):
        body["metadata"]["namespace"] = kube.namespace
        kube.client.request("POST", path, body=body)
        chaos = on_steps(kube.step_log, [(lose_at, lose), (BACK, come_back)], stop)
        try:
            done = kube.eventually(
                lambda: (
                    (kube.client.get_job(kube.namespace, "tiny-cpu") or {})
                    .get("status", {})
                    .get("phase")
                    in ("Succeeded", "Failed")
                ),
                timeout=420,
                what="the job to end",
            )
            assert done
        finally:
            stop.set()
            chaos.join()
    found = kube.client.get_job(kube.namespace, "tiny-cpu") or {}
    return JobStatus.model_validate(found.get("status") or {})


def on_this_machine(tmp_path: Path, body: dict[str, Any]) -> JobStatus:
    run_dir = tmp_path / "local"
    job_file = tmp_path / "local.yaml"
    job_file.write_text(yaml.safe_dump(body))

    def slot0(down: bool) -> Callable[[], None]:
        def act() -> None:
            capacity, gone = read_capacity(run_dir)
            write_capacity(run_dir, capacity, gone | {0} if down else gone - {0})

        return act

    stop = threading.Event()
    chaos = on_steps(run_dir / "steps.jsonl", [(LOSE, slot0(True)), (BACK, slot0(False))], stop)
    try:
        return run(load_job(job_file), run_dir, workers=2)
    finally:
        stop.set()
        chaos.join()


def figures_of(status: JobStatus) -> Goodput:
    figures = goodput(status, now=time.time())
    assert figures is not None
    return figures


def test_a_lost_node_costs_restart_and_restore_badput_and_with_agents_a_run_loses_less(
    running_kube: RunningKubelet,
    controlplane: ControlPlane,
    operator_identity: Identity,
    tmp_path: Path,
) -> None:
    build_stdlib_corpus(tmp_path / "data")
    job = tiny_job(tmp_path)
    cluster = on_the_cluster(
        running_kube, controlplane, operator_identity, job, worker_agents=False
    )
    (tmp_path / "cluster-status.json").write_text(cluster.model_dump_json(by_alias=True))
    assert cluster.phase == Phase.SUCCEEDED, running_kube.describe()
    assert cluster.restarts.by_reason.get("WorkerLost") == 1
    assert cluster.restarts.by_reason.get("Resized") == 1
    on_kube = figures_of(cluster)
    assert 0 < on_kube.ratio < 1
    assert cluster.goodput is not None  # what `kubectl get ptj -o wide` shows
    assert cluster.goodput.ratio == pytest.approx(on_kube.ratio, abs=0.001)
    assert on_kube.badput["restart"] > 0
    assert on_kube.badput["restore"] > 0
    assert on_kube.badput["stage_transition"] > 0
    assert on_kube.productive + sum(on_kube.badput.values()) == pytest.approx(on_kube.wall)
    # The recovery, phase by phase: its eight phases add up to its total.
    last = cluster.last_recovery
    assert last is not None
    assert cluster.recoveries.count == 1
    phases = last.phases.model_dump()
    assert sum(phases.values()) == pytest.approx(last.total_seconds, abs=0.1)
    assert sum(cluster.recoveries.sums[p] for p in PHASES) == pytest.approx(
        cluster.recoveries.sums[TOTAL], abs=0.1
    )
    for phase in ("rendezvous", "init", "first_step"):
        assert phases[phase] > 0, phases
    killed = min(running_kube.killed_at.values())
    # Lost at the node's death as the cluster says it (seconds resolution), noticed after it.
    assert last.lost_at.timestamp() == pytest.approx(killed, abs=2.0)
    assert cluster.last_checkpoint is not None
    assert cluster.last_checkpoint.stage == 1
    # The operator's series come from that status alone (an operator restart loses nothing).
    metrics = OperatorMetrics()
    metrics.jobs[("ns", "tiny-cpu")] = JobSnapshot("ns", "tiny-cpu", cluster)
    samples = {
        (s.name, s.labels.get("phase")): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert samples[("pretrainjob_goodput_ratio", None)] == pytest.approx(on_kube.ratio, abs=0.01)
    assert samples[("pretrainjob_recovery_phase_seconds_count", "restore")] == 1
    assert samples[("pretrainjob_last_recovery_phase_seconds", "restore")] == phases["restore"]

    local = on_this_machine(tmp_path, tiny_job(tmp_path))
    assert local.phase == Phase.SUCCEEDED
    here = figures_of(local)
    assert here.productive + sum(here.badput.values()) == pytest.approx(here.wall)
    assert 0 < here.badput["restart"] < on_kube.badput["restart"], (here, on_kube)
    assert here.ratio > on_kube.ratio, (here, on_kube)
    assert local.last_recovery is not None
    assert local.last_recovery.total_seconds < last.total_seconds


def test_with_worker_agents_a_lost_node_restarts_on_the_surviving_pod_from_its_memory(
    running_kube: RunningKubelet,
    controlplane: ControlPlane,
    operator_identity: Identity,
    tmp_path: Path,
) -> None:
    build_stdlib_corpus(tmp_path / "data")
    job = tiny_job(tmp_path)
    job["spec"]["checkpoint"]["memoryIntervalSteps"] = 5  # storage keeps every 10th step
    back: list[float] = []
    cluster = on_the_cluster(
        running_kube,
        controlplane,
        operator_identity,
        job,
        lose_at=(0, 28),
        back=back,
        worker_agents=True,
        agent_poll_seconds=120,  # a trainer's end is heard of from its pod's readiness
    )
    (tmp_path / "cluster-status.json").write_text(cluster.model_dump_json(by_alias=True))
    assert cluster.phase == Phase.SUCCEEDED, running_kube.describe()
    assert cluster.restarts.by_reason.get("WorkerLost") == 1
    records = [json.loads(line) for line in running_kube.step_log.read_text().splitlines()]
    assert records[-1]["worldSize"] == 2  # the node came back in time for the last stage
    # The end of stage 0 (its trainers exited) was noticed long before the agents' next read.
    assert 0 < figures_of(cluster).badput["stage_transition"] < 60
    # Every worker pod started once, through the restart, the stage transition and the end;
    # the lost node's slot got a new pod only once the node was back.
    lost = {pod for pod in running_kube.killed_at if pod.startswith("tiny-cpu-w")}
    assert len(lost) == 1, running_kube.killed_at
    starts = [(name, when) for name, _, when in running_kube.started]
    names = [name for name, _ in starts]
    assert sorted(names) == sorted(["tiny-cpu-w0", "tiny-cpu-w1", *lost]), starts
    again = [when for name, when in starts if name in lost][-1]
    assert again >= back[0], (starts, back)
    # The attempt after the loss ran on the survivor alone, from the memory tier, at a step
    # storage never had (it saves every 10th).
    restart = min(r["attempt"] for r in records if r["attempt"] > 1)
    first = min(r["step"] for r in records if r["attempt"] == restart)
    assert {r["worldSize"] for r in records if r["attempt"] == restart} == {1}
    assert 20 < first <= 29, first
    (survivor,) = {"tiny-cpu-w0", "tiny-cpu-w1"} - lost
    log = (running_kube.workdir / "pods" / survivor / f"attempt-{restart}.log").read_text()
    found = re.search(r"restored everything from \S+ \((\w+)\)", log)
    assert found is not None, log[-2000:]
    assert found[1] == "memory", log[-2000:]
    last = cluster.last_recovery
    assert last is not None
    phases = last.phases.model_dump()
    assert sum(phases.values()) == pytest.approx(last.total_seconds, abs=0.1)
    print(f"recovery with worker agents: {last.total_seconds:.2f} s, phases {phases}")
