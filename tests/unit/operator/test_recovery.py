"""Recoveries split into their eight phases, carried pass by pass through the status."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pretrain_operator.api import (
    JobStatus,
    Phase,
    Reason,
    RecoveringStatus,
    StageStatus,
    TrainerUsage,
)
from pretrain_operator.local.display import recovery_table
from pretrain_operator.plan import Event, Observed, Worker, WorkerState
from pretrain_operator.telemetry.recovery import BUCKETS, PHASES, phases, track
from rich.console import Console

STAGE = StageStatus(index=0, name="s")


def usage(attempt: int, **times: float) -> TrainerUsage:
    return TrainerUsage(attempt=attempt, **times)


def test_the_phases_are_the_spans_between_consecutive_moments_and_add_up() -> None:
    recovering = RecoveringStatus(
        reason="WorkerLost", lost_at=100.0, noticed_at=100.5, started_at=103.0, bound_at=104.0
    )
    read = usage(
        2,
        launcher_time=106.0,
        group_time=110.0,
        engine_time=111.5,
        restored_time=114.0,
        restore_seconds=2.0,  # of which 0.5 s before the engine was built
        first_step_time=114.75,
    )
    split = phases(recovering, read)
    assert split.model_dump() == pytest.approx(
        {
            "detect": 0.5,
            "backoff": 2.5,
            "schedule": 1.0,
            "start": 2.0,
            "rendezvous": 4.0,
            "init": 2.0,
            "restore": 2.0,
            "first_step": 0.75,
        }
    )
    assert sum(split.model_dump().values()) == pytest.approx(114.75 - 100.0)


def test_a_moment_reported_before_the_previous_one_makes_an_empty_phase_not_a_negative() -> None:
    recovering = RecoveringStatus(
        reason="WorkerLost", lost_at=10.0, noticed_at=11.0, started_at=12.0
    )
    # The node's clock is 0.5 s behind: its launcher "started" before the pod was created.
    read = usage(
        2,
        launcher_time=11.5,
        group_time=13.0,
        engine_time=14.0,
        restored_time=14.0,
        first_step_time=15.0,
    )
    split = phases(recovering, read).model_dump()
    assert split["schedule"] == 0.0  # bound unknown: at the start
    assert split["start"] == 0.0
    assert split["rendezvous"] == pytest.approx(1.0)
    assert min(split.values()) >= 0.0
    assert sum(split.values()) == pytest.approx(15.0 - 10.0)


def running(attempt: int, *, started: float, read: TrainerUsage | None = None) -> JobStatus:
    return JobStatus(
        phase=Phase.RUNNING,
        attempt=attempt,
        attempt_started_at=datetime.fromtimestamp(started, UTC),
        stage=STAGE,
        usage=read,
    )


def test_track_follows_one_recovery_from_the_loss_to_the_first_step() -> None:
    lost = Observed((Worker(slot=0, state=WorkerState.LOST, attempt=1, ended_at=49.0),))
    loss = (Event(Reason.WORKER_LOST, "worker 0 lost", warning=True),)
    before = running(1, started=0.0)
    restarting = JobStatus(phase=Phase.RESTARTING, attempt=1, stage=STAGE)
    status = track(before, restarting, events=loss, observed=lost, now=50.0)
    assert status.recovering == RecoveringStatus(reason="WorkerLost", lost_at=49.0, noticed_at=50.0)
    started = track(
        status,
        running(2, started=52.0).model_copy(update={"recovering": status.recovering}),
        events=(),
        observed=Observed(),
        now=52.0,
    )
    assert started.recovering is not None
    assert started.recovering.started_at == 52.0
    bound = Observed(
        (
            Worker(slot=0, state=WorkerState.RUNNING, attempt=2, bound_at=53.0),
            Worker(slot=1, state=WorkerState.RUNNING, attempt=2, bound_at=53.5),
        )
    )
    read = usage(
        2,
        launcher_time=54.0,
        group_time=56.0,
        engine_time=57.0,
        restored_time=58.0,
        first_step_time=59.0,
    )
    done = track(
        started,
        running(2, started=52.0, read=read).model_copy(update={"recovering": started.recovering}),
        events=(),
        observed=bound,
        now=60.0,
    )
    assert done.recovering is None
    last = done.last_recovery
    assert last is not None
    assert last.total_seconds == pytest.approx(59.0 - 49.0)
    assert last.phases.schedule == pytest.approx(1.5)  # to the last worker bound
    assert sum(last.phases.model_dump().values()) == pytest.approx(last.total_seconds, abs=0.1)
    assert done.recoveries.count == 1
    assert set(done.recoveries.buckets) == {*PHASES, "total"}
    total = done.recoveries.buckets["total"]
    assert total == [int(b >= 10.0) for b in BUCKETS]


def test_a_suspension_ends_a_recovery_unmeasured() -> None:
    recovering = RecoveringStatus(reason="Preempted", lost_at=1.0, noticed_at=2.0)
    suspended = JobStatus(phase=Phase.SUSPENDED, attempt=1, recovering=recovering)
    assert track(suspended, suspended, events=(), observed=Observed(), now=3.0).recovering is None


def test_the_run_summary_lists_every_phase_of_the_last_recovery_and_the_mean() -> None:
    recovering = RecoveringStatus(
        reason="WorkerLost", lost_at=0.0, noticed_at=1.0, attempt=2, started_at=2.0
    )
    read = usage(
        2,
        launcher_time=3.0,
        group_time=7.0,
        engine_time=9.0,
        restored_time=9.5,
        first_step_time=10.0,
    )
    done = track(
        JobStatus(attempt=2, recovering=recovering),
        running(2, started=2.0, read=read).model_copy(update={"recovering": recovering}),
        events=(),
        observed=Observed(),
        now=11.0,
    )
    console = Console(record=True, width=80)
    table = recovery_table(done)
    assert table is not None
    console.print(table)
    lines = console.export_text().splitlines()
    rows = {line.split("│")[1].strip(): line for line in lines if line.count("│") == 4}
    assert list(rows) == [*(p.replace("_", " ") for p in PHASES), "total"]
    assert "10.00" in rows["total"]  # the loss at 0 s to the first step at 10 s
    assert recovery_table(JobStatus()) is None  # no recovery: no table
