"""Goodput accounting on hand-made timelines: every second lands in one bucket."""

from __future__ import annotations

import itertools

import pytest
from pretrain_operator.telemetry.goodput import Attempt, account
from pretrain_trainer.contract import StepRecord


def step(
    stage: int, number: int, *, end: float, seconds: float = 1.0, **extra: float
) -> StepRecord:
    return StepRecord(
        stage=stage, step=number, tokens=0, lr=0.0, seconds=seconds, time=end, world_size=1, **extra
    )


def test_a_failure_charges_lost_work_restart_and_restore_and_every_second_is_counted() -> None:
    steps = [
        step(0, 1, end=5),
        step(0, 2, end=6),
        step(0, 3, end=7),  # checkpoint after step 3
        step(0, 4, end=8.6, checkpoint_blocking=0.5),  # began at 7.6: 0.5 s blocked, 0.1 other
        # a loss at 9; the attempt after it starts at 10 and restores step 3 in 2 s
        step(0, 4, end=14, restore_seconds=2.0),  # step 4 again: the first run was lost
    ]
    attempts = [
        Attempt(started=0, cause="startup"),
        Attempt(started=10, cause="restart", lost_at=9),
    ]
    result = account(started=0, now=15, steps=steps, attempts=attempts)
    assert result.wall == 14  # the second after the last step is not known yet
    assert result.productive == pytest.approx(4)
    assert result.badput == pytest.approx(
        {
            "startup": 4,
            "checkpoint_blocking": 0.5,
            "restore": 2,
            "restart": 2.4 + 1,
            "other": 0.1,
            "stage_transition": 0,
            "waiting_for_workers": 0,
        }
    )
    assert result.productive + sum(result.badput.values()) == pytest.approx(result.wall)
    assert result.recoveries == pytest.approx((5,))
    assert result.ratio == pytest.approx(4 / 14)


def test_stage_transitions_waits_for_workers_and_suspensions() -> None:
    steps = [step(0, 1, end=2), step(1, 1, end=10, restore_seconds=1.0)]
    attempts = [Attempt(0, "startup"), Attempt(4, "stage_transition")]
    result = account(
        started=0, now=20, steps=steps, attempts=attempts, waiting=[(3, 5)], suspended=[(6, 7)]
    )
    assert result.wall == 10 - 1  # up to the last step, less the suspension
    assert result.productive == 2
    assert result.badput["startup"] == 1
    assert result.badput["waiting_for_workers"] == 2
    assert result.badput["restore"] == 1
    assert result.badput["stage_transition"] == pytest.approx(7 - 2 - 1 - 1)
    assert result.badput["other"] == 0  # after the last step nothing is charged yet
    assert result.productive + sum(result.badput.values()) == pytest.approx(result.wall)


def test_no_bucket_ever_shrinks_as_the_run_goes_on() -> None:
    steps = [step(0, 1, end=2), step(0, 2, end=3), step(0, 2, end=12, restore_seconds=2.0)]
    attempts = [Attempt(0, "startup"), Attempt(6, "restart", lost_at=4)]
    seen = [
        account(
            started=0,
            now=now,
            steps=[r for r in steps if r.time <= now],
            attempts=[a for a in attempts if a.started <= now],
        )
        for now in range(1, 14)
    ]
    for before, after in itertools.pairwise(seen):
        assert after.productive >= before.productive
        for reason, seconds in before.badput.items():
            assert after.badput[reason] >= seconds - 1e-9, (reason, before, after)
