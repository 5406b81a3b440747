"""The planning core, scenario by scenario: what runs, what stops, what the status says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pretrain_operator.api import JobStatus, Phase, PretrainJobSpec, parse_job
from pretrain_operator.plan import Observed, Plan, Worker, WorkerState, plan
from pretrain_trainer.contract import ExitCode, StageReport

from tests.conftest import minimal_job

NOW = datetime(2026, 1, 1, tzinfo=UTC)
S = WorkerState


def _spec(**elastic: Any) -> PretrainJobSpec:
    stages = [
        {
            "name": "foundation",
            "budget": {"steps": 10},
            "dataMix": {"prose": 1},
            "globalBatchSize": 8,
        },
        {
            "name": "instruction",
            "budget": {"steps": 10},
            "dataMix": {"code": 1},
            "globalBatchSize": 8,
        },
    ]
    base = {
        "minWorkers": 1,
        "maxWorkers": 4,
        "maxRestarts": 2,
        "restartBackoffSeconds": 10,
        "scaleUpCooldownSeconds": 60,
    }
    return parse_job(minimal_job(stages=stages, elastic={**base, **elastic})).spec


def _idle(*slots: int) -> tuple[Worker, ...]:
    return tuple(Worker(slot=s, state=S.IDLE) for s in slots)


def _running(attempt: int, *slots: int, stage: int = 0) -> tuple[Worker, ...]:
    return tuple(Worker(slot=s, state=S.RUNNING, attempt=attempt, stage=stage) for s in slots)


def _go(spec: PretrainJobSpec, status: JobStatus, *workers: Worker, at: datetime = NOW) -> Plan:
    return plan(spec=spec, status=status, observed=Observed(workers), now=at)


def _started(spec: PretrainJobSpec, *slots: int) -> JobStatus:
    return _go(spec, JobStatus(), *_idle(*slots)).status


def test_a_new_job_starts_the_largest_exact_group_on_available_slots() -> None:
    spec = _spec()
    result = _go(spec, JobStatus(), *_idle(0, 1, 2))  # 3 available; 8 splits into 1, 2, 4
    assert result.group is not None
    assert (result.group.attempt, result.group.slots) == (1, (0, 1))
    assert result.status.phase == Phase.RUNNING
    assert result.status.stage is not None
    assert result.status.stage.name == "foundation"
    assert [e.reason for e in result.events] == ["Created"]


def test_without_enough_capacity_the_job_waits_and_looks_again() -> None:
    spec = _spec(minWorkers=2)
    result = _go(spec, JobStatus(), *_idle(0), Worker(slot=1, state=S.PENDING))
    assert result.group is None
    assert result.status.phase == Phase.PENDING
    assert result.status.conditions[-1].reason == "WaitingForWorkers"
    assert result.requeue_after is not None


def test_a_running_group_keeps_running_and_reports_ready_workers() -> None:
    spec = _spec()
    status = _started(spec, 0, 1)
    result = _go(spec, status, *_running(1, 0, 1), *_idle(2))
    assert result.group is not None
    assert result.group.slots == (0, 1)
    assert (result.status.phase, result.status.workers.ready) == (Phase.RUNNING, 2)
    assert result.stop == ()
    assert _go(spec, status, *_running(1, 0, 1), *_idle(2)) == result  # level-triggered


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (Worker(slot=1, state=S.LOST, attempt=1, reason="NodeNotReady"), "WorkerLost"),
        (Worker(slot=1, state=S.LOST, attempt=1, reason="Preempted"), "Preempted"),
        (Worker(slot=1, state=S.FAILED, attempt=1, exit_code=ExitCode.RETRYABLE), "WorkerFailed"),
        (None, "WorkerLost"),  # the worker vanished (pod deleted)
    ],
)
def test_a_lost_or_failed_worker_stops_the_group_and_counts_a_restart(
    broken: Worker | None, reason: str
) -> None:
    spec = _spec()
    status = _started(spec, 0, 1)
    workers = (*_running(1, 0), *((broken,) if broken else ()))
    result = _go(spec, status, *workers)
    assert result.group is None
    assert result.stop == (0,)
    assert result.status.phase == Phase.RESTARTING
    assert result.status.restarts.by_reason == {reason: 1}
    assert result.status.next_attempt_at == NOW + timedelta(seconds=10)
    assert result.events[-1].warning


def test_after_the_backoff_the_survivors_continue_at_a_smaller_world_size() -> None:
    spec = _spec()
    failed = _go(spec, _started(spec, 0, 1), *_running(1, 0)).status  # worker 1 gone
    early = _go(spec, failed, *_idle(0), at=NOW + timedelta(seconds=5))
    assert early.group is None
    assert early.requeue_after == pytest.approx(5)
    later = _go(spec, failed, *_idle(0), at=NOW + timedelta(seconds=11))
    assert later.group is not None
    assert (later.group.attempt, later.group.slots) == (2, (0,))
    assert later.status.workers.desired == 1


def test_consecutive_failures_double_the_backoff() -> None:
    spec = _spec(maxRestarts=5)
    status, at = _started(spec, 0), NOW
    delays = []
    for attempt in (1, 2, 3):
        status = _go(spec, status, Worker(slot=0, state=S.LOST, attempt=attempt), at=at).status
        assert status.next_attempt_at is not None
        delays.append((status.next_attempt_at - at).total_seconds())
        at = status.next_attempt_at
        status = _go(spec, status, *_idle(0), at=at).status
    assert delays == [10, 20, 40]


def test_more_failures_than_max_restarts_fail_the_job() -> None:
    spec = _spec(maxRestarts=1)
    status = _started(spec, 0)
    status = _go(spec, status, Worker(slot=0, state=S.LOST, attempt=1)).status
    status = _go(spec, status, *_idle(0), at=NOW + timedelta(seconds=60)).status
    result = _go(spec, status, Worker(slot=0, state=S.LOST, attempt=2))
    assert result.status.phase == Phase.FAILED
    assert result.status.conditions[-1].reason == "RestartLimitExceeded"


def test_a_permanent_trainer_error_fails_the_job_at_once() -> None:
    spec = _spec()
    error = "cannot write checkpoint /c/stage-0/step-8: No space left on device (ENOSPC)"
    failed = Worker(slot=0, state=S.FAILED, attempt=1, exit_code=ExitCode.PERMANENT, reason=error)
    result = _go(spec, _started(spec, 0), failed)
    assert result.status.phase == Phase.FAILED
    assert result.status.conditions[-1].reason == "PermanentError"
    assert result.status.conditions[-1].message.endswith(f"a permanent error: {error}")


def _finished(attempt: int, *slots: int, stage: int = 0) -> tuple[Worker, ...]:
    report = StageReport(stage=stage, step=10, tokens=2560, loss=1.5, checkpoint="/c/stage-0")
    return tuple(
        Worker(slot=s, state=S.SUCCEEDED, attempt=attempt, stage=stage, exit_code=0, report=report)
        for s in slots
    )


def test_a_finished_stage_starts_the_next_one_as_a_new_attempt() -> None:
    spec = _spec()
    result = _go(spec, _started(spec, 0, 1), *_finished(1, 0, 1))
    assert result.group is not None
    assert (result.group.stage, result.group.attempt) == (1, 2)
    assert result.status.stage is not None
    assert result.status.stage.name == "instruction"
    assert [(r.name, r.step, r.checkpoint) for r in result.status.stages] == [
        ("foundation", 10, "/c/stage-0")
    ]
    assert "StageCompleted" in [e.reason for e in result.events]


def test_the_last_stage_finishing_succeeds_the_job() -> None:
    spec = _spec()
    status = _go(spec, _started(spec, 0), *_finished(1, 0)).status
    result = _go(spec, status, *_finished(2, 0, stage=1))
    assert result.group is None
    assert result.status.phase == Phase.SUCCEEDED
    assert [r.name for r in result.status.stages] == ["foundation", "instruction"]
    # A terminal job stays terminal, whatever is observed.
    assert _go(spec, result.status, *_idle(0, 1)).group is None


def test_suspend_stops_workers_and_resume_starts_a_new_attempt() -> None:
    spec = _spec()
    status = _started(spec, 0, 1)
    suspended = _go(spec.model_copy(update={"suspend": True}), status, *_running(1, 0, 1))
    assert (suspended.group, suspended.stop) == (None, (0, 1))
    assert suspended.status.phase == Phase.SUSPENDED
    resumed = _go(spec, suspended.status, *_idle(0, 1))
    assert resumed.group is not None
    assert resumed.group.attempt == 2
    assert "Resumed" in [e.reason for e in resumed.events]


def test_capacity_coming_back_grows_the_group_after_the_cooldown() -> None:
    spec = _spec()
    status = _started(spec, 0)  # one worker at first
    workers = (*_running(1, 0), *_idle(1, 2, 3))
    soon = _go(spec, status, *workers, at=NOW + timedelta(seconds=30))
    assert soon.group is not None
    assert soon.group.attempt == 1  # still in the cool-down
    later = _go(spec, status, *workers, at=NOW + timedelta(seconds=61))
    assert later.group is not None
    assert (later.group.attempt, later.group.slots) == (2, (0, 1, 2, 3))
    assert later.stop == (0,)  # the old group's worker makes way
    assert later.status.restarts.by_reason == {"Resized": 1}


def test_resizes_do_not_count_against_max_restarts() -> None:
    spec = _spec(maxRestarts=0, scaleUpCooldownSeconds=0)
    status = _started(spec, 0)
    status = _go(spec, status, *_running(1, 0), *_idle(1)).status  # resize to 2
    assert status.phase == Phase.RESTARTING
    running = _go(spec, status, *_running(2, 0, 1)).status
    assert running.phase == Phase.RUNNING


def test_a_start_waits_up_to_the_cool_down_for_capacity_being_scheduled() -> None:
    spec = _spec()  # 8 splits into 1, 2, 4: one ready slot alone would start a group of 1
    coming = (Worker(slot=1, state=S.PENDING),)  # a standby the scheduler has not placed yet
    waiting = _go(spec, JobStatus(), *_idle(0), *coming)
    assert waiting.group is None
    assert waiting.status.conditions[-1].reason == "WaitingForWorkers"
    assert "waiting up to 60s to start 2 instead of 1" in waiting.status.conditions[-1].message
    assert waiting.status.waiting_since == NOW
    # The capacity arrives: both start together.
    placed = _go(spec, waiting.status, *_idle(0, 1), at=NOW + timedelta(seconds=5))
    assert placed.group is not None
    assert placed.group.slots == (0, 1)
    assert placed.status.waiting_since is None
    # It never arrives: after the cool-down the group starts with what there is.
    late = _go(spec, waiting.status, *_idle(0), *coming, at=NOW + timedelta(seconds=61))
    assert late.group is not None
    assert late.group.slots == (0,)


def test_a_worker_that_never_starts_counts_as_lost_after_the_start_timeout() -> None:
    spec = _spec(startTimeoutSeconds=300)
    status = _started(spec, 0, 1)
    stuck = (*_running(1, 0), Worker(slot=1, state=S.PENDING, attempt=1, stage=0))
    waiting = _go(spec, status, *stuck, at=NOW + timedelta(seconds=299))
    assert waiting.status.phase != Phase.RESTARTING  # still within the timeout
    restarted = _go(spec, status, *stuck, at=NOW + timedelta(seconds=301))
    assert restarted.status.phase == Phase.RESTARTING
    assert restarted.status.restarts.by_reason == {"WorkerLost": 1}
    assert "worker 1 did not start within 300s" in restarted.status.conditions[-1].message
