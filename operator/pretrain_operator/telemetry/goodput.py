"""Goodput: how much of a job's wall time went into training that counted, and where the rest
went. Pure: computed from the trainer's step records and the attempts the control plane started.

Every second since the job started (suspensions excluded) lands in exactly one bucket:

- productive: inside a training step whose result survived (the last run of each (stage, step));
- ``restart``: steps redone after a failure (work lost since the last checkpoint), the time from
  a failure to the next attempt, and that attempt's start-up (process start, rendezvous, engine
  set-up) less its restore; resizes count here too;
- ``restore``: loading the checkpoint (the trainer reports it with its first step);
- ``checkpoint_blocking``: training stopped while a save copied the state out;
- ``stage_transition``: from a stage's last step to the next stage's first, less its restore;
- ``waiting_for_workers``: no group could run for lack of workers;
- ``startup``: the first attempt's start, before the job's very first step;
- ``other``: the rest (logging, data loading between steps).

``goodput_ratio = productive / wall``, where the wall time ends at the last moment whose use is
known (the last step, or the start of an attempt or a wait after it): no bucket ever shrinks.
Recovery times (a loss to the first step of the attempt that followed it) come out of the same
walk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pretrain_trainer.contract import StepRecord

REASONS = (
    "restart",
    "restore",
    "checkpoint_blocking",
    "stage_transition",
    "waiting_for_workers",
    "startup",
    "other",
)


@dataclass(frozen=True)
class Attempt:
    started: float
    """Unix time the control plane started it."""
    cause: str
    """``startup``, ``restart`` or ``stage_transition``: the bucket its start-up is charged to."""
    lost_at: float | None = None
    """For an attempt after a failure: when the loss was seen (the start of the recovery)."""


@dataclass(frozen=True)
class Goodput:
    wall: float
    productive: float
    badput: dict[str, float] = field(default_factory=dict)
    recoveries: tuple[float, ...] = ()

    @property
    def ratio(self) -> float:
        return self.productive / self.wall if self.wall > 0 else 0.0


def _overlap(start: float, end: float, spans: Sequence[tuple[float, float]]) -> float:
    return sum(max(0.0, min(end, b) - max(start, a)) for a, b in spans)


def account(
    *,
    started: float,
    now: float,
    steps: Sequence[StepRecord],
    attempts: Sequence[Attempt] = (),
    waiting: Sequence[tuple[float, float]] = (),
    suspended: Sequence[tuple[float, float]] = (),
) -> Goodput:
    """Split ``[started, now]`` (less ``suspended``) into productive time and badput."""
    badput = dict.fromkeys(REASONS, 0.0)
    records = sorted(steps, key=lambda r: r.time)
    last_run = {(r.stage, r.step): i for i, r in enumerate(records)}
    attempts = sorted(attempts, key=lambda a: a.started)
    productive = 0.0

    def charge_gap(start: float, end: float, record: StepRecord | None) -> None:
        if end <= start:
            return
        pause = _overlap(start, end, suspended)
        wait = _overlap(start, end, waiting)
        span = max(end - start - pause - wait, 0.0)
        badput["waiting_for_workers"] += wait
        restore = min((record.restore_seconds or 0.0) if record else 0.0, span)
        blocking = min((record.checkpoint_blocking or 0.0) if record else 0.0, span - restore)
        badput["restore"] += restore
        badput["checkpoint_blocking"] += blocking
        # The rest of a gap in which an attempt started, or that ends in an attempt's first
        # step (it restored), is that attempt's start-up: charged to what caused it.
        begun = [a for a in attempts if a.started <= end]
        starting = bool(restore) or any(start <= a.started for a in begun)
        cause = begun[-1].cause if begun and starting else "other"
        badput[cause] += span - restore - blocking

    edge = started
    for i, record in enumerate(records):
        end = min(record.time, now)
        begin = max(end - record.seconds, edge)
        charge_gap(edge, begin, record)
        if last_run[(record.stage, record.step)] == i:
            productive += end - begin
        else:
            badput["restart"] += end - begin  # redone after a failure: lost work
        edge = max(edge, end)
    # After the last step, only what is already known: waiting, and the time up to the start of
    # an attempt. The rest is charged once the next step says how it was spent, so no bucket
    # ever shrinks (they are Prometheus counters) and the accounted wall time ends there.
    known = [a.started for a in attempts if edge < a.started <= now]
    known += [min(b, now) for a, b in waiting if a < now]
    settled = max([edge, *known])
    charge_gap(edge, settled, None)

    recoveries = []
    for attempt in attempts:
        if attempt.lost_at is None:
            continue
        first = next((r.time for r in records if r.time > attempt.started), None)
        if first is not None:
            recoveries.append(first - attempt.lost_at)
    wall = max(settled - started - _overlap(started, settled, suspended), 0.0)
    return Goodput(wall=wall, productive=productive, badput=badput, recoveries=tuple(recoveries))
