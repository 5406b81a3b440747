"""Goodput accounting over hand-made passes: the statuses a planner writes and the usage a
trainer reports. Every second lands in one bucket, lost work is charged as restart, and the
figures live in the status (recomputed from it alone) and never go down."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from pretrain_operator.api import (
    Condition,
    JobStatus,
    Phase,
    Reason,
    StageStatus,
    TrainerUsage,
)
from pretrain_operator.telemetry.goodput import REASONS, Goodput, account, goodput


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def running(attempt: int, *, started: float, stage: int = 0) -> JobStatus:
    return JobStatus(
        phase=Phase.RUNNING,
        attempt=attempt,
        attempt_started_at=at(started),
        stage=StageStatus(index=stage, name=f"s{stage}"),
    )


def waiting(attempt: int, *, stage: int = 0) -> JobStatus:
    condition = Condition(
        type="Restarting", status="True", reason=Reason.WAITING_FOR_WORKERS, message="waiting"
    )
    return JobStatus(
        phase=Phase.RESTARTING,
        attempt=attempt,
        stage=StageStatus(index=stage, name=f"s{stage}"),
        conditions=[condition],
    )


def usage(attempt: int, **fields: float) -> TrainerUsage:
    return TrainerUsage(attempt=attempt, **fields)


@dataclass
class Passes:
    """Runs passes through ``account`` the way a backend does, keeping only the status."""

    status: JobStatus = field(default_factory=JobStatus)

    def run(
        self,
        now: float,
        planned: JobStatus,
        read: TrainerUsage | None = None,
        *,
        stopped: bool = False,
    ) -> Goodput:
        carried = planned.model_copy(
            update={
                "goodput": self.status.goodput,
                "usage": self.status.usage,
            }
        )
        self.status = account(self.status, carried, usage=read, now=now, stopped=stopped)
        # Only what the status says: a restarted operator reading it back gets the same.
        again = JobStatus.model_validate(self.status.model_dump(mode="json", by_alias=True))
        figures = goodput(again, now=now)
        assert figures is not None
        assert figures == goodput(self.status, now=now)
        return figures


def assert_every_second_counted(figures: Goodput) -> None:
    assert figures.productive + sum(figures.badput.values()) == pytest.approx(figures.wall)


def test_held_out_evaluation_is_its_own_bucket_not_other() -> None:
    """An attempt's loop: 6 s in steps, 1 s blocked by a save, 2 s evaluating, the rest
    (data, logging) other."""
    passes = Passes()
    read = usage(
        1,
        restored_time=2.0,
        steps=6,
        step=6,
        step_seconds=6.0,
        blocking_seconds=1.0,
        eval_seconds=2.0,
        last_step_time=12.0,
    )
    figures = passes.run(12.0, running(1, started=0.0), read)
    assert figures.productive == pytest.approx(6.0)
    assert figures.badput["evaluation"] == pytest.approx(2.0)
    assert figures.badput["checkpoint_blocking"] == pytest.approx(1.0)
    assert figures.badput["other"] == pytest.approx(10.0 - 6.0 - 1.0 - 2.0)
    assert_every_second_counted(figures)


def test_a_failure_charges_lost_work_as_restart_with_the_gap_and_the_next_start_up() -> None:
    passes = Passes()
    passes.run(0.0, running(1, started=0.0))
    # 4 s of start-up, then 5 steps of 1 s and a 0.5 s blocking save; durable at step 3.
    first = usage(
        1,
        restored_time=4.0,
        steps=5,
        step=5,
        step_seconds=5.0,
        blocking_seconds=0.5,
        checkpoint_step=3,
        checkpoint_step_seconds=3.0,
        last_step_time=10.0,
    )
    seen = passes.run(10.0, running(1, started=0.0), first)
    assert seen.productive == 5.0  # provisional until the attempt ends
    assert seen.badput["restart"] == 0.0
    # The loss is noticed; a back-off: nothing more is known of the time until the next start.
    passes.run(
        11.0, JobStatus(phase=Phase.RESTARTING, attempt=1, stage=StageStatus(index=0, name="s0"))
    )
    passes.run(13.0, running(2, started=13.0))
    # The next attempt resumes from step 3: 1 s to its restore, which takes 2 s.
    second = usage(
        2,
        resumed_step=3,
        restored_time=16.0,
        restore_seconds=2.0,
        steps=3,
        step=6,
        step_seconds=3.0,
        last_step_time=20.0,
    )
    figures = passes.run(20.0, running(2, started=13.0), second)
    assert figures.wall == pytest.approx(20.0)
    assert figures.productive == pytest.approx(3.0 + 3.0)
    assert figures.badput == pytest.approx(
        {
            "startup": 4.0,
            "restart": 2.0 + 3.0 + 1.0,  # steps 4-5 lost, the gap, the start-up before restore
            "restore": 2.0,
            "checkpoint_blocking": 0.5,
            "evaluation": 0.0,
            "other": 0.5 + 1.0,
            "stage_transition": 0.0,
            "waiting_for_workers": 0.0,
        }
    )
    assert_every_second_counted(figures)
    assert figures.ratio == pytest.approx(6.0 / 20.0)


def test_an_attempt_that_wrote_no_checkpoint_loses_every_step_once_the_next_resumes() -> None:
    passes = Passes()
    passes.run(0.0, running(1, started=0.0))
    passes.run(
        5.0,
        running(1, started=0.0),
        usage(1, restored_time=1.0, steps=4, step=4, step_seconds=4.0, last_step_time=5.0),
    )
    ended = passes.run(6.0, running(2, started=6.0))
    assert ended.productive == 4.0  # until the next attempt says where it resumed
    resumed = passes.run(9.0, running(2, started=6.0), usage(2, resumed_step=0, restored_time=8.0))
    assert resumed.productive == 0.0
    assert resumed.badput["restart"] == pytest.approx(4.0 + 1.0)
    assert_every_second_counted(resumed)


def test_steps_up_to_a_save_nobody_reported_survive_where_the_next_attempt_resumes() -> None:
    passes = Passes()
    passes.run(0.0, running(1, started=0.0))
    # 10 steps of 1 s from step 20; durable at step 25 as last read; a resize stops it, and
    # its preemption save of step 28 is never read: the next attempt resumes from step 28.
    passes.run(
        11.0,
        running(1, started=0.0),
        usage(
            1,
            resumed_step=20,
            restored_time=1.0,
            steps=10,
            step=30,
            step_seconds=10.0,
            checkpoint_step=25,
            checkpoint_step_seconds=5.0,
            last_step_time=11.0,
        ),
    )
    passes.run(12.0, running(2, started=12.0))
    figures = passes.run(
        14.0, running(2, started=12.0), usage(2, resumed_step=28, restored_time=13.5)
    )
    assert figures.productive == pytest.approx(8.0)  # steps 21-28
    assert figures.badput["restart"] == pytest.approx(2.0 + 1.0)  # steps 29-30, the gap
    assert_every_second_counted(figures)


def test_stage_transition_waiting_and_suspension_each_land_in_their_bucket() -> None:
    passes = Passes()
    passes.run(0.0, running(1, started=0.0))
    passes.run(
        3.0,
        running(1, started=0.0),
        usage(1, restored_time=1.0, steps=2, step=2, step_seconds=2.0, last_step_time=3.0),
    )
    # The stage's last step at 3 s; the next stage waits for workers from 4 to 6 s, is
    # suspended from 6 to 9 s, and starts at 10 s.
    passes.run(4.0, waiting(1, stage=1))
    passes.run(
        6.0, JobStatus(phase=Phase.SUSPENDED, attempt=1, stage=StageStatus(index=1, name="s1"))
    )
    shown = passes.run(
        9.0, JobStatus(phase=Phase.PENDING, attempt=1, stage=StageStatus(index=1, name="s1"))
    )
    assert shown.badput["waiting_for_workers"] == pytest.approx(2.0)  # known as it happens
    passes.run(10.0, running(2, started=10.0, stage=1))
    figures = passes.run(
        13.0,
        running(2, started=10.0, stage=1),
        usage(
            2,
            restored_time=11.0,
            restore_seconds=0.5,
            steps=2,
            step=2,
            step_seconds=2.0,
            last_step_time=13.0,
        ),
    )
    assert figures.wall == pytest.approx(13.0 - 3.0)  # less the suspension
    assert figures.productive == pytest.approx(2.0 + 2.0)  # a finished stage loses nothing
    assert figures.badput["startup"] == pytest.approx(1.0)
    assert figures.badput["waiting_for_workers"] == pytest.approx(2.0)
    # 3 -> 10 s less the wait and the suspension, and the next start-up before its restore
    assert figures.badput["stage_transition"] == pytest.approx(7.0 - 2.0 - 3.0 + 0.5)
    assert figures.badput["restore"] == pytest.approx(0.5)
    assert figures.badput["restart"] == 0.0
    assert_every_second_counted(figures)


def test_no_bucket_ever_shrinks_and_the_figures_survive_a_restart_from_status() -> None:
    passes = Passes()
    timeline: list[tuple[float, JobStatus, TrainerUsage | None]] = [
        (0.0, running(1, started=0.0), None)
    ]
    for t in range(2, 9):  # a step a second from 2 s, durable every 3 steps
        step = t - 1
        durable = (step // 3) * 3
        timeline.append(
            (
                float(t),
                running(1, started=0.0),
                usage(
                    1,
                    restored_time=1.0,
                    steps=step,
                    step=step,
                    step_seconds=float(step),
                    checkpoint_step=durable or None,
                    checkpoint_step_seconds=float(durable),
                    last_step_time=float(t),
                ),
            )
        )
    timeline += [(9.0, waiting(1), None), (12.0, running(2, started=12.0), None)]
    timeline.append(
        (
            15.0,
            running(2, started=12.0),
            usage(
                2,
                resumed_step=6,
                restored_time=13.0,
                restore_seconds=0.5,
                steps=2,
                step=8,
                step_seconds=2.0,
                last_step_time=15.0,
            ),
        )
    )
    seen = [passes.run(now, planned, read) for now, planned, read in timeline]
    for before, after in itertools.pairwise(seen):
        assert after.wall >= before.wall
        for reason in REASONS:
            assert after.badput[reason] >= before.badput[reason] - 1e-9, reason
    # step 7 lost, 8 -> 12 s less the 3 s wait, the start-up before the restore
    assert seen[-1].badput["restart"] == pytest.approx(1.0 + 1.0 + 0.5)
    assert seen[-1].badput["waiting_for_workers"] == pytest.approx(3.0)
    assert_every_second_counted(seen[-1])


def test_a_pass_that_reads_nothing_keeps_the_attempts_last_usage() -> None:
    passes = Passes()
    passes.run(0.0, running(1, started=0.0))
    read = usage(1, restored_time=1.0, steps=1, step=1, step_seconds=1.0, last_step_time=2.0)
    before = passes.run(2.0, running(1, started=0.0), read)
    after = passes.run(30.0, running(1, started=0.0), None)
    assert after == before
    assert passes.status.usage == read


def test_a_first_attempt_lost_before_its_first_step_was_start_up_until_the_loss() -> None:
    passes = Passes()
    passes.run(0.0, running(1, started=0.0))
    restarting = JobStatus(phase=Phase.RESTARTING, attempt=1, stage=StageStatus(index=0, name="s0"))
    passes.run(8.0, restarting, stopped=True)  # lost at 8 s, still starting
    passes.run(9.0, running(2, started=9.0))
    figures = passes.run(
        12.0,
        running(2, started=9.0),
        usage(2, restored_time=11.0, steps=1, step=1, step_seconds=1.0, last_step_time=12.0),
    )
    assert figures.badput["startup"] == pytest.approx(8.0)
    assert figures.badput["restart"] == pytest.approx(1.0 + 2.0)  # the back-off, the restart
    assert figures.productive == pytest.approx(1.0)
    assert_every_second_counted(figures)
