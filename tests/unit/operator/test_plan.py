"""The planning core, scenario by scenario: what runs, what stops, what the status says."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pretrain_operator.api import (
    JobStatus,
    MicroBatchesStatus,
    Phase,
    PretrainJobSpec,
    Reason,
    RestartsStatus,
    StageRecord,
    StageStatus,
    WorkersStatus,
    parse_job,
)
from pretrain_operator.plan import Observed, Plan, Worker, WorkerState, plan
from pretrain_trainer.contract import ExitCode, StageReport

from tests.conftest import minimal_job

NOW = datetime(2026, 1, 1, tzinfo=UTC)
S = WorkerState
REPORT = StageReport(stage=0, step=10, tokens=2560, loss=1.5, checkpoint="/c/stage-0")
"""What every finished stage in these tests reports."""
BACKOFF = 10
"""The restart back-off of :func:`_spec`, in seconds."""


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
        "restartBackoffSeconds": BACKOFF,
        "scaleUpCooldownSeconds": 60,
    }
    return parse_job(minimal_job(stages=stages, elastic={**base, **elastic})).spec


@dataclass(frozen=True)
class StatusBuilder:
    """A job status as the planner leaves it, built step by step, as JobSet's test wrappers
    build objects: ``make_status(spec).running(attempt=1, slots=(0, 1)).obj()``. Conditions are
    left out: they are what the planner writes and the tests check. Each step returns a new
    builder, so one can be the start of several statuses."""

    spec: PretrainJobSpec
    status: JobStatus = field(default_factory=JobStatus)

    def _with(self, **fields: Any) -> StatusBuilder:
        return replace(self, status=self.status.model_copy(update=fields))

    def at_stage(self, index: int) -> StatusBuilder:
        """Training stage ``index``; every stage before it finished with :data:`REPORT`."""
        stage = StageStatus(index=index, name=self.spec.stages[index].name, started_at=NOW)
        if index == 0:
            return self._with(stage=stage)
        done = [
            StageRecord(
                index=i,
                name=self.spec.stages[i].name,
                started_at=NOW,
                finished_at=NOW,
                step=REPORT.step,
                tokens=REPORT.tokens,
                loss=REPORT.loss,
                checkpoint=REPORT.checkpoint,
            )
            for i in range(index)
        ]
        return self._with(
            stage=stage, stages=done, step=REPORT.step, tokens=REPORT.tokens, loss=REPORT.loss
        )

    def running(self, *, attempt: int, slots: tuple[int, ...]) -> StatusBuilder:
        """Attempt ``attempt`` started at :data:`NOW` on ``slots``, in the first stage unless
        :meth:`at_stage` said otherwise."""
        built = self if self.status.stage is not None else self.at_stage(0)
        assert built.status.stage is not None
        counts = self.spec.worker_counts(self.spec.stages[built.status.stage.index])
        split = MicroBatchesStatus.of(counts.split(len(slots)))
        workers = WorkersStatus(desired=len(slots), ready=0, slots=list(slots), micro_batches=split)
        return built._with(
            phase=Phase.RUNNING,
            attempt=attempt,
            attempt_started_at=NOW,
            waiting_since=None,
            workers=workers,
        )

    def restarting(self, reason: Reason) -> StatusBuilder:
        """The group stopped at :data:`NOW` for ``reason``, the first failure in a row: the
        next attempt waits one back-off."""
        counts = self.status.restarts
        by_reason = {**counts.by_reason, reason: counts.by_reason.get(reason, 0) + 1}
        return self._with(
            phase=Phase.RESTARTING,
            restarts=RestartsStatus(total=counts.total + 1, by_reason=by_reason),
            failures_in_a_row=self.status.failures_in_a_row + 1,
            next_attempt_at=NOW + timedelta(seconds=BACKOFF),
            workers=self.status.workers.model_copy(update={"slots": []}),
        )

    def suspended(self) -> StatusBuilder:
        return self._with(phase=Phase.SUSPENDED)

    def obj(self) -> JobStatus:
        return self.status


def make_status(spec: PretrainJobSpec) -> StatusBuilder:
    return StatusBuilder(spec)


def _idle(*slots: int) -> tuple[Worker, ...]:
    return tuple(Worker(slot=s, state=S.IDLE) for s in slots)


def _running(attempt: int, *slots: int, stage: int = 0) -> tuple[Worker, ...]:
    return tuple(Worker(slot=s, state=S.RUNNING, attempt=attempt, stage=stage) for s in slots)


def _finished(attempt: int, *slots: int, stage: int = 0) -> tuple[Worker, ...]:
    report = REPORT.model_copy(update={"stage": stage})
    return tuple(
        Worker(slot=s, state=S.SUCCEEDED, attempt=attempt, stage=stage, exit_code=0, report=report)
        for s in slots
    )


def _go(spec: PretrainJobSpec, status: JobStatus, *workers: Worker, at: datetime = NOW) -> Plan:
    return plan(spec=spec, status=status, observed=Observed(workers), now=at)


def _suspending(spec: PretrainJobSpec) -> PretrainJobSpec:
    return spec.model_copy(update={"suspend": True})


def _without_conditions(status: JobStatus) -> JobStatus:
    return status.model_copy(update={"conditions": []})


def test_the_statuses_the_tests_build_are_the_ones_the_planner_writes() -> None:
    spec = _spec()
    running = make_status(spec).running(attempt=1, slots=(0, 1, 2))
    started = _go(spec, JobStatus(), *_idle(0, 1, 2)).status
    lost = _go(spec, started, *_running(1, 0, 1)).status
    suspended = _go(_suspending(spec), started, *_running(1, 0, 1, 2)).status
    next_stage = _go(spec, _go(spec, JobStatus(), *_idle(0)).status, *_finished(1, 0)).status
    assert [_without_conditions(s) for s in (started, lost, suspended, next_stage)] == [
        running.obj(),
        running.restarting(Reason.WORKER_LOST).obj(),
        running.suspended().obj(),
        make_status(spec).at_stage(1).running(attempt=2, slots=(0,)).obj(),
    ]


def test_a_new_job_starts_the_fastest_group_on_available_slots() -> None:
    spec = _spec()
    result = _go(spec, JobStatus(), *_idle(0, 1, 2))  # 8 micro-batches: 3, 3 and 2 on 3
    assert result.group is not None
    assert (result.group.attempt, result.group.slots) == (1, (0, 1, 2))
    assert result.status.workers.micro_batches == MicroBatchesStatus(
        most=3, fewest=2, efficiency=0.8889
    )
    assert result.status.phase == Phase.RUNNING
    assert result.status.stage is not None
    assert result.status.stage.name == "foundation"
    assert [e.reason for e in result.events] == [Reason.CREATED]


def test_without_enough_capacity_the_job_waits_and_looks_again() -> None:
    spec = _spec(minWorkers=2)
    result = _go(spec, JobStatus(), *_idle(0), Worker(slot=1, state=S.PENDING))
    assert result.group is None
    assert result.status.phase == Phase.PENDING
    assert result.status.conditions[-1].reason == Reason.WAITING_FOR_WORKERS
    assert result.requeue_after is not None


def test_a_running_group_keeps_running_and_reports_ready_workers() -> None:
    spec = _spec()
    status = make_status(spec).running(attempt=1, slots=(0, 1)).obj()
    result = _go(spec, status, *_running(1, 0, 1), *_idle(2))
    assert result.group is not None
    assert result.group.slots == (0, 1)
    assert (result.status.phase, result.status.workers.ready) == (Phase.RUNNING, 2)
    assert result.stop == ()
    assert _go(spec, status, *_running(1, 0, 1), *_idle(2)) == result  # level-triggered


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (Worker(slot=1, state=S.LOST, attempt=1, reason="NodeNotReady"), Reason.WORKER_LOST),
        (Worker(slot=1, state=S.LOST, attempt=1, reason="Preempted"), Reason.PREEMPTED),
        (
            Worker(slot=1, state=S.FAILED, attempt=1, exit_code=ExitCode.RETRYABLE),
            Reason.WORKER_FAILED,
        ),
        (None, Reason.WORKER_LOST),  # the worker vanished (pod deleted)
    ],
)
def test_a_lost_or_failed_worker_stops_the_group_and_counts_a_restart(
    broken: Worker | None, reason: Reason
) -> None:
    spec = _spec()
    status = make_status(spec).running(attempt=1, slots=(0, 1)).obj()
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
    running = make_status(spec).running(attempt=1, slots=(0, 1))
    failed = running.restarting(Reason.WORKER_LOST).obj()  # worker 1 gone
    early = _go(spec, failed, *_idle(0), at=NOW + timedelta(seconds=5))
    assert early.group is None
    assert early.requeue_after == pytest.approx(5)
    later = _go(spec, failed, *_idle(0), at=NOW + timedelta(seconds=11))
    assert later.group is not None
    assert (later.group.attempt, later.group.slots) == (2, (0,))
    assert later.status.workers.desired == 1


def test_consecutive_failures_double_the_backoff() -> None:
    spec = _spec(maxRestarts=5)
    status, at = make_status(spec).running(attempt=1, slots=(0,)).obj(), NOW
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
    status = make_status(spec).running(attempt=1, slots=(0,)).obj()
    status = _go(spec, status, Worker(slot=0, state=S.LOST, attempt=1)).status
    assert status.phase == Phase.RESTARTING  # the first failure is within maxRestarts
    status = _go(spec, status, *_idle(0), at=NOW + timedelta(seconds=60)).status
    result = _go(spec, status, Worker(slot=0, state=S.LOST, attempt=2))
    assert result.status.phase == Phase.FAILED
    assert result.status.conditions[-1].reason == Reason.RESTART_LIMIT_EXCEEDED


def test_a_permanent_trainer_error_fails_the_job_at_once() -> None:
    spec = _spec()
    error = "cannot write checkpoint /c/stage-0/step-8: No space left on device (ENOSPC)"
    failed = Worker(slot=0, state=S.FAILED, attempt=1, exit_code=ExitCode.PERMANENT, reason=error)
    result = _go(spec, make_status(spec).running(attempt=1, slots=(0,)).obj(), failed)
    assert result.status.phase == Phase.FAILED
    assert result.status.conditions[-1].reason == Reason.PERMANENT_ERROR
    assert result.status.conditions[-1].message.endswith(f"a permanent error: {error}")


def test_a_finished_stage_starts_the_next_one_as_a_new_attempt() -> None:
    spec = _spec()
    status = make_status(spec).running(attempt=1, slots=(0, 1)).obj()
    result = _go(spec, status, *_finished(1, 0, 1))
    assert result.group is not None
    assert (result.group.stage, result.group.attempt) == (1, 2)
    assert result.status.stage is not None
    assert result.status.stage.name == "instruction"
    assert [(r.name, r.step, r.checkpoint) for r in result.status.stages] == [
        ("foundation", 10, "/c/stage-0")
    ]
    assert Reason.STAGE_COMPLETED in [e.reason for e in result.events]


def test_the_last_stage_finishing_succeeds_the_job() -> None:
    spec = _spec()
    status = make_status(spec).at_stage(1).running(attempt=2, slots=(0,)).obj()
    result = _go(spec, status, *_finished(2, 0, stage=1))
    assert result.group is None
    assert result.status.phase == Phase.SUCCEEDED
    assert [r.name for r in result.status.stages] == ["foundation", "instruction"]
    # A terminal job stays terminal, whatever is observed.
    assert _go(spec, result.status, *_idle(0, 1)).group is None


def test_suspend_stops_workers_and_resume_starts_a_new_attempt() -> None:
    spec = _spec()
    status = make_status(spec).running(attempt=1, slots=(0, 1)).obj()
    suspended = _go(_suspending(spec), status, *_running(1, 0, 1))
    assert (suspended.group, suspended.stop) == (None, (0, 1))
    assert suspended.status.phase == Phase.SUSPENDED
    resumed = _go(spec, suspended.status, *_idle(0, 1))
    assert resumed.group is not None
    assert resumed.group.attempt == 2
    assert Reason.RESUMED in [e.reason for e in resumed.events]


def test_a_suspended_job_stays_stopped_and_says_so_only_once() -> None:
    spec = _spec()
    status = make_status(spec).running(attempt=1, slots=(0, 1)).suspended().obj()
    again = _go(_suspending(spec), status, *_running(1, 0))  # a worker that has not stopped yet
    assert (again.group, again.stop, again.events) == (None, (0,), ())
    assert again.status.phase == Phase.SUSPENDED


def test_capacity_coming_back_grows_the_group_after_the_cooldown() -> None:
    spec = _spec()
    status = make_status(spec).running(attempt=1, slots=(0,)).obj()  # one worker at first
    workers = (*_running(1, 0), *_idle(1, 2, 3))
    soon = _go(spec, status, *workers, at=NOW + timedelta(seconds=30))
    assert soon.group is not None
    assert soon.group.attempt == 1  # still in the cool-down
    later = _go(spec, status, *workers, at=NOW + timedelta(seconds=61))
    assert later.group is not None
    assert (later.group.attempt, later.group.slots) == (2, (0, 1, 2, 3))
    assert later.stop == (0,)  # the old group's worker makes way
    assert later.status.restarts.by_reason == {Reason.RESIZED: 1}


def test_resizes_do_not_count_against_max_restarts() -> None:
    spec = _spec(maxRestarts=0, scaleUpCooldownSeconds=0)
    status = make_status(spec).running(attempt=1, slots=(0,)).obj()
    status = _go(spec, status, *_running(1, 0), *_idle(1)).status  # resize to 2
    assert status.phase == Phase.RESTARTING
    running = _go(spec, status, *_running(2, 0, 1)).status
    assert running.phase == Phase.RUNNING


def test_a_start_waits_up_to_the_cool_down_for_capacity_being_scheduled() -> None:
    spec = _spec()  # 8 splits into 1, 2, 4: one ready slot alone would start a group of 1
    coming = (Worker(slot=1, state=S.PENDING),)  # a standby the scheduler has not placed yet
    waiting = _go(spec, JobStatus(), *_idle(0), *coming)
    assert waiting.group is None
    assert waiting.status.conditions[-1].reason == Reason.WAITING_FOR_WORKERS
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
    status = make_status(spec).running(attempt=1, slots=(0, 1)).obj()
    stuck = (*_running(1, 0), Worker(slot=1, state=S.PENDING, attempt=1, stage=0))
    waiting = _go(spec, status, *stuck, at=NOW + timedelta(seconds=299))
    assert waiting.status.phase != Phase.RESTARTING  # still within the timeout
    restarted = _go(spec, status, *stuck, at=NOW + timedelta(seconds=301))
    assert restarted.status.phase == Phase.RESTARTING
    assert restarted.status.restarts.by_reason == {Reason.WORKER_LOST: 1}
    assert "worker 1 did not start within 300s" in restarted.status.conditions[-1].message
