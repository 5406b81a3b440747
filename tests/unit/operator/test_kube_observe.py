"""Reading pods as workers (``kube.observe``) and correcting the watch cache for the
operator's own writes (``kube.cache``): pure, table-driven."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pretrain_operator.kube.cache import Expectations
from pretrain_operator.kube.observe import observe, ready_nodes
from pretrain_operator.plan import Worker, WorkerState
from pretrain_trainer.contract import StageReport

S = WorkerState


def pod(
    name: str,
    *,
    role: str = "worker",
    slot: int = 0,
    attempt: int = 1,
    phase: str = "Running",
    node: str | None = "n0",
    **extra: Any,
) -> dict[str, Any]:
    labels = {"pretrain.dev/job": "j", "pretrain.dev/role": role, "pretrain.dev/slot": str(slot)}
    if role == "worker":
        labels |= {"pretrain.dev/attempt": str(attempt), "pretrain.dev/stage": "0"}
    body: dict[str, Any] = {
        "metadata": {"name": name, "uid": f"uid-{name}", "labels": labels},
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": phase},
    }
    for key, value in extra.items():
        if key == "terminated":
            body["status"]["containerStatuses"] = [
                {"name": "trainer", "state": {"terminated": value}}
            ]
        elif key == "conditions":
            body["status"]["conditions"] = value
        elif key == "deleting":
            body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        elif key == "reason":
            body["status"]["reason"] = value
    return body


READY = {"n0": True, "n1": False}
DELETED = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
REPORT = {"finished": True, "stage": 0, "step": 40, "tokens": 9, "loss": 2.5, "checkpoint": "/c"}


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        ([pod("w", phase="Pending", node=None)], Worker(0, S.PENDING, attempt=1, stage=0)),
        ([pod("w")], Worker(0, S.RUNNING, attempt=1, stage=0)),
        ([pod("w", node="n1")], Worker(0, S.LOST, attempt=1, stage=0, reason="node n1 not ready")),
        (
            [pod("w", deleting=True)],
            Worker(0, S.LOST, attempt=1, stage=0, reason="deleted", ended_at=DELETED),
        ),
        (
            [
                pod(
                    "w",
                    conditions=[
                        {
                            "type": "DisruptionTarget",
                            "status": "True",
                            "reason": "PreemptionByScheduler",
                        }
                    ],
                )
            ],
            Worker(0, S.LOST, attempt=1, stage=0, reason="preempted"),
        ),
        (
            [pod("w", phase="Failed", reason="Evicted")],
            Worker(0, S.LOST, attempt=1, stage=0, reason="evicted"),
        ),
        (
            [
                pod(
                    "w",
                    phase="Failed",
                    terminated={
                        "exitCode": 1,
                        "message": json.dumps(
                            {"finished": False, "exitCode": 78, "error": "bad shard"}
                        ),
                    },
                )
            ],
            Worker(0, S.FAILED, attempt=1, stage=0, exit_code=78, reason="bad shard"),
        ),
        (
            [pod("w", phase="Failed", terminated={"exitCode": 137})],
            Worker(0, S.FAILED, attempt=1, stage=0, exit_code=137),
        ),
        (
            [
                pod(
                    "w",
                    phase="Succeeded",
                    terminated={"exitCode": 0, "message": json.dumps(REPORT)},
                )
            ],
            Worker(
                0,
                S.SUCCEEDED,
                attempt=1,
                stage=0,
                exit_code=0,
                report=StageReport(stage=0, step=40, tokens=9, loss=2.5, checkpoint="/c"),
            ),
        ),
        ([], Worker(0, S.LOST, attempt=1, reason="pod deleted")),  # in the group, gone
    ],
)
def test_the_current_attempts_pod_reads_as_its_worker(
    pods: list[dict[str, Any]], expected: Worker
) -> None:
    observed = observe(pods, READY, attempt=1, group_slots=[0])
    assert observed.workers == (expected,)


def test_a_worker_carries_when_it_was_bound_and_when_it_ended() -> None:
    scheduled = {
        "type": "PodScheduled",
        "status": "True",
        "lastTransitionTime": "2026-01-01T00:00:05Z",
    }
    bound = observe([pod("w", conditions=[scheduled])], READY, attempt=1, group_slots=[0])
    assert bound.workers[0].bound_at == DELETED + 5
    finished = {"exitCode": 137, "finishedAt": "2026-01-01T00:00:09Z"}
    ended = observe(
        [pod("w", phase="Failed", terminated=finished)], READY, attempt=1, group_slots=[0]
    )
    assert ended.workers[0].ended_at == DELETED + 9
    leaving = pod("w", deleting=True)
    leaving["metadata"]["deletionGracePeriodSeconds"] = 30  # asked 30 s before the deadline
    gone = observe([leaving], READY, attempt=1, group_slots=[0])
    assert gone.workers[0].ended_at == DELETED - 30


@pytest.mark.parametrize(
    ("pods", "expected"),
    [
        ([pod("s", role="standby")], Worker(0, S.IDLE)),  # capacity
        ([pod("s", role="standby", phase="Pending", node=None)], Worker(0, S.PENDING)),
        ([pod("old", attempt=1)], Worker(0, S.RUNNING, attempt=1, stage=0)),  # to be stopped
        ([pod("old", attempt=1, deleting=True)], Worker(0, S.PENDING)),  # leaving: coming back
        ([pod("old", attempt=1, phase="Succeeded")], Worker(0, S.PENDING)),  # done: no pod yet
        (  # an old worker lost with its node holds nothing: the standby beside it counts
            [pod("old", attempt=1, node="n1", deleting=True), pod("s", role="standby")],
            Worker(0, S.IDLE),
        ),
        ([], Worker(0, S.PENDING)),  # no pod yet: a standby is about to ask for it
    ],
)
def test_a_slot_outside_the_group_reads_as_capacity_or_its_absence(
    pods: list[dict[str, Any]], expected: Worker
) -> None:
    observed = observe(pods, READY, attempt=2, group_slots=[], slots=1)
    assert observed.workers == (expected,)


def test_node_readiness_comes_from_the_ready_condition() -> None:
    def node(name: str, *conditions: dict[str, str]) -> dict[str, Any]:
        return {"metadata": {"name": name}, "status": {"conditions": list(conditions)}}

    nodes = [
        node("a", {"type": "Ready", "status": "True"}),
        node("b", {"type": "Ready", "status": "False"}),
        node("c"),
    ]
    assert ready_nodes(nodes) == {"a": True, "b": False, "c": False}


def test_expectations_add_created_pods_the_cache_has_not_shown_yet() -> None:
    expectations = Expectations(ttl=30)
    created = pod("new", phase="Pending", node=None)
    expectations.record(created=[created], deleted=[], now=0)
    assert expectations.correct([], now=1) == [created]
    assert expectations.correct([created], now=2) == [created]  # seen: no longer expected
    assert expectations.created == {}


def test_expectations_mark_deleted_pods_the_cache_still_shows_as_leaving() -> None:
    expectations = Expectations(ttl=30)
    old = pod("old")
    expectations.record(created=[], deleted=[old], now=0)
    (corrected,) = expectations.correct([old], now=1)
    assert corrected["metadata"]["deletionTimestamp"]
    assert "deletionTimestamp" not in old["metadata"]  # the cache's copy is left alone
    assert expectations.correct([], now=2) == []  # gone: nothing left to expect
    assert expectations.deleted == {}


def test_expectations_expire_and_the_cache_is_believed() -> None:
    expectations = Expectations(ttl=30)
    expectations.record(created=[pod("lost-event")], deleted=[pod("old")], now=0)
    assert expectations.correct([pod("old")], now=31) == [pod("old")]
    assert (expectations.created, expectations.deleted) == ({}, {})


def test_progress_is_read_from_the_trainers_own_exposition() -> None:
    from datetime import UTC, datetime

    from pretrain_operator.api import JobStatus, Phase, StageStatus, parse_job
    from pretrain_operator.kube.progress import parse
    from pretrain_operator.telemetry.progress import with_progress
    from pretrain_trainer.metrics import TrainerMetrics
    from prometheus_client import generate_latest

    from tests.conftest import minimal_job

    trainer = TrainerMetrics(namespace="ml", job="j", stage="s")
    assert parse(generate_latest(trainer.registry).decode()) is not None  # step 0, no loss yet
    assert parse(generate_latest(trainer.registry).decode()).loss is None  # type: ignore[union-attr]
    trainer.step.set(4)  # of the minimal job's 10
    trainer.stage_tokens.set(7680)
    trainer.loss.set(3.5)
    trainer.step_seconds.observe(2.0)
    trainer.step_seconds.observe(4.0)
    read = parse(generate_latest(trainer.registry).decode())
    assert read is not None
    assert (read.step, read.tokens, read.loss, read.seconds_per_step) == (4, 7680, 3.5, 3.0)
    spec = parse_job(minimal_job()).spec
    now = datetime(2026, 1, 1, tzinfo=UTC)
    running = JobStatus(phase=Phase.RUNNING, stage=StageStatus(index=0, name="x", started_at=now))
    total = spec.stages[0].total_steps(spec.model)
    shown = with_progress(running, spec, read, now=now)
    assert (shown.step, shown.tokens, shown.loss) == (4, 7680, 3.5)
    assert shown.eta is not None
    assert (shown.eta - now).total_seconds() == (total - 4) * 3.0 > 0
    assert with_progress(JobStatus(), spec, read, now=now) == JobStatus()  # not running


def test_a_standby_the_scheduler_found_no_node_for_is_not_capacity_on_its_way() -> None:
    stuck = pod("s", role="standby", phase="Pending", node=None)
    stuck["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    ]
    assert observe([stuck], READY, attempt=2, group_slots=[], slots=1).workers == ()
    stuck["status"]["conditions"][0]["reason"] = "SchedulerError"
    waiting = observe([stuck], READY, attempt=2, group_slots=[], slots=1).workers
    assert waiting == (Worker(0, S.PENDING),)
