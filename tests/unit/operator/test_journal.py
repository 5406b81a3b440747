"""A local run's memory (``local.journal``): the timeline it writes and reads back, the step
log it follows, and the attempts, waits and suspensions goodput is computed from."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pretrain_operator.api import (
    Condition,
    JobStatus,
    Phase,
    Reason,
    StageStatus,
    parse_job,
)
from pretrain_operator.local.journal import Journal
from pretrain_operator.plan import Event
from pretrain_operator.telemetry.goodput import Attempt, account
from pretrain_trainer.contract import StepRecord, append_step

from tests.conftest import minimal_job


def step(number: int, *, end: float, **extra: float) -> StepRecord:
    return StepRecord(
        stage=0,
        step=number,
        tokens=256 * number,
        loss=3.0,
        lr=1e-3,
        seconds=1.0,
        time=end,
        world_size=2,
        **extra,
    )


WAITING = JobStatus(
    phase=Phase.RESTARTING,
    conditions=[Condition(type="Restarting", status="True", reason=Reason.WAITING_FOR_WORKERS)],
)


def test_the_timeline_is_written_as_it_happens_and_read_back_by_the_next_run(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    journal.note([Event(Reason.CREATED, "starting stage s")], JobStatus(), now=1.0)
    journal.note([], WAITING, now=2.0)
    journal.note([], WAITING, now=3.0)  # still waiting: said once
    journal.suspended(now=4.0)
    again = Journal(tmp_path)
    assert [(e.time, e.reason) for e in again.timeline] == [
        (1.0, Reason.CREATED),
        (2.0, Reason.WAITING_FOR_WORKERS),
        (4.0, Reason.SUSPENDED),
    ]
    assert again.timeline == journal.timeline


def test_goodput_sees_each_attempt_its_cause_and_the_loss_before_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.note([Event(Reason.CREATED, "starting stage s")], JobStatus(), now=0.0)
    steps = [step(1, end=3), step(2, end=4), step(3, end=5)]
    journal.note([Event(Reason.WORKER_LOST, "worker 1 lost", warning=True)], JobStatus(), now=6.0)
    journal.note([], WAITING, now=6.5)
    journal.note([Event(Reason.RESTARTED, "starting stage s")], JobStatus(), now=8.0)
    steps.append(step(3, end=11, restore_seconds=1.5))
    for record in steps:
        append_step(tmp_path / "steps.jsonl", record)
    expected = account(
        started=0.0,
        now=12.0,
        steps=steps,
        attempts=[Attempt(0.0, "startup"), Attempt(8.0, "restart", lost_at=6.0)],
        waiting=[(6.5, 8.0)],
    )
    assert journal.goodput(now=12.0) == expected
    assert expected.recoveries == pytest.approx((5.0,))  # the loss to the first step after it


def test_progress_shows_the_newest_step_and_an_eta_at_the_recent_step_time(
    tmp_path: Path,
) -> None:
    spec = parse_job(minimal_job()).spec  # 10 steps
    running = JobStatus(phase=Phase.RUNNING, stage=StageStatus(index=0, name="foundation"))
    for number in (1, 2, 3, 4):
        append_step(tmp_path / "steps.jsonl", step(number, end=100.0 + 2 * number))
    shown = Journal(tmp_path).progress(running, spec, now=1000.0)
    assert (shown.step, shown.tokens, shown.loss) == (4, 1024, 3.0)
    assert shown.eta == datetime.fromtimestamp(108.0 + 6 * 2.0, UTC)
    assert Journal(tmp_path).progress(JobStatus(), spec, now=1000.0) == JobStatus()
