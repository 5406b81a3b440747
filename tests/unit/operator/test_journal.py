"""A local run's memory (``local.journal``): the timeline it writes and reads back, the step
log it follows, and the running attempt's usage folded from it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pretrain_operator.api import (
    Condition,
    JobStatus,
    Phase,
    Reason,
    StageStatus,
    TrainerUsage,
    parse_job,
)
from pretrain_operator.local.journal import Journal
from pretrain_operator.plan import Event
from pretrain_trainer.contract import Startup, StepRecord, append_step

from tests.conftest import minimal_job


def step(number: int, *, end: float, **extra: Any) -> StepRecord:
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


def test_usage_folds_the_running_attempts_records_as_rank_0_metrics_would_say(
    tmp_path: Path,
) -> None:
    log = tmp_path / "steps.jsonl"
    start = Startup(launcher=1.0, group=2.0, engine=3.0, restored=4.0)
    append_step(log, step(5, end=9.0, attempt=1, startup=start, restore_seconds=0.5))
    append_step(log, step(6, end=10.0, attempt=1, checkpoint_blocking=0.25))
    append_step(log, step(7, end=11.0, attempt=1, checkpointed=6))
    journal = Journal(tmp_path)
    assert journal.usage() == TrainerUsage(
        attempt=1,
        resumed_step=4,
        step=7,
        steps=3,
        step_seconds=3.0,
        restore_seconds=0.5,
        blocking_seconds=0.25,
        checkpoint_step=6,
        checkpoint_step_seconds=2.0,  # steps 5 and 6
        checkpoint_time=11.0,
        last_step_time=11.0,
        launcher_time=1.0,
        group_time=2.0,
        engine_time=3.0,
        restored_time=4.0,
        first_step_time=9.0,
    )
    append_step(log, step(5, end=20.0, attempt=2))  # the next attempt starts afresh
    fresh = journal.usage()
    assert fresh is not None
    assert (fresh.attempt, fresh.resumed_step, fresh.steps, fresh.checkpoint_step) == (
        2,
        4,
        1,
        None,
    )


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
