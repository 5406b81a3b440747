"""Goodput: how much of a job's wall time went into training that counted, and where the rest
went. One accounting for both backends, pure.

Its inputs are what every backend has: the status the planner writes (attempts, their starts,
waits, suspensions, stages) and the running attempt's :class:`~pretrain_operator.api.
TrainerUsage`, the trainer's cumulative counters (seconds inside steps, restore, checkpoint
blocking, the newest durable checkpoint and the step seconds up to it), read from the step
log locally and from rank 0's ``/metrics`` on Kubernetes. :func:`account` folds one pass into
``status.goodput``; :func:`goodput` reads the figures. Everything lives in the status, so an
operator restart loses nothing, and the sums only grow.

Every second since the job's first pass (suspensions excluded) lands in one bucket:

- productive: inside a training step whose result survived;
- ``restart``: steps redone after a failure or a resize (those after the attempt's newest
  durable checkpoint), the time from the end of an attempt's known work to the next attempt's
  start, and that attempt's start-up up to its restore;
- ``restore``: loading the checkpoint;
- ``checkpoint_blocking``: training stopped while a save copied the state out;
- ``stage_transition``: the same as ``restart`` for the attempt that starts the next stage;
- ``waiting_for_workers``: no group could run for lack of workers;
- ``startup``: the same for the job's first attempt;
- ``other``: the rest of an attempt's training loop (data, logging between steps).

A running attempt's steps count as productive until it ends; if it ends by a failure or a
resize, those after its newest durable checkpoint move to ``restart``. The wall time ends at
the last moment whose use is known (the running attempt's newest step, or the last start or
wait): the time after it is charged once the next report says how it was spent, so no bucket
ever shrinks (they are Prometheus counters).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api import GoodputStatus, JobStatus, Phase, Reason, TrainerUsage

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
class Goodput:
    wall: float
    productive: float
    badput: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.productive / self.wall if self.wall > 0 else 0.0


@dataclass(frozen=True)
class _Share:
    """How one attempt used ``[started, end]``."""

    end: float
    productive: float
    badput: dict[str, float]


def attempt_share(
    usage: TrainerUsage | None, *, started: float, cause: str, ended: bool, completed: bool
) -> _Share:
    """The use of an attempt's time from its start to its newest step. ``ended``: it is over,
    so the steps after its newest durable checkpoint are lost work, unless it ``completed``
    its stage (the final checkpoint keeps every step)."""
    badput = dict.fromkeys(REASONS, 0.0)
    if usage is None or usage.last_step_time is None:
        return _Share(started, 0.0, badput)
    end = max(usage.last_step_time, started)
    restored = min(max(usage.restored_time or started, started), end)
    restore = min(usage.restore_seconds, restored - started)
    badput[cause] += restored - started - restore
    badput["restore"] += restore
    loop = end - restored
    steps = min(usage.step_seconds, loop)
    blocking = min(usage.blocking_seconds, loop - steps)
    badput["checkpoint_blocking"] += blocking
    badput["other"] += loop - steps - blocking
    kept = steps
    if ended and not completed:
        durable = usage.checkpoint_step is not None and usage.checkpoint_step > usage.resumed_step
        kept = min(usage.checkpoint_step_seconds, steps) if durable else 0.0
    badput["restart"] += steps - kept
    return _Share(end, kept, badput)


def _add(totals: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    return {r: totals.get(r, 0.0) + more.get(r, 0.0) for r in REASONS}


def _waiting(status: JobStatus) -> bool:
    """No group could start for lack of workers (Pending or Restarting says why)."""
    return status.phase in (Phase.PENDING, Phase.RESTARTING) and any(
        c.reason == Reason.WAITING_FOR_WORKERS for c in status.conditions
    )


def _stage(status: JobStatus) -> int:
    return status.stage.index if status.stage is not None else 0


def _cause(ledger: GoodputStatus, status: JobStatus) -> str:
    """What a new attempt's start-up is charged to, from the attempt before it."""
    if not ledger.attempts:
        return "startup"
    return "stage_transition" if _stage(status) != ledger.attempt_stage else "restart"


def _usage_of(attempt: int, *candidates: TrainerUsage | None) -> TrainerUsage | None:
    return next((u for u in candidates if u is not None and u.attempt == attempt), None)


def account(
    previous: JobStatus, status: JobStatus, *, usage: TrainerUsage | None, now: float
) -> JobStatus:
    """``status`` (what the planner just decided from ``previous``) with the goodput ledger and
    the running attempt's ``usage`` (None: nothing new was read) carried one pass on."""
    ledger = previous.goodput or GoodputStatus(started=now, gap_from=now)
    update: dict[str, object] = {}
    terminal = status.phase in (Phase.SUCCEEDED, Phase.FAILED)
    # The attempt accounted so far is over: fold its share, lost work included.
    if ledger.attempt and (status.attempt != ledger.attempt or terminal):
        last = _usage_of(ledger.attempt, usage, previous.usage)
        finished = status.phase == Phase.SUCCEEDED or _stage(status) > ledger.attempt_stage
        share = attempt_share(
            last,
            started=ledger.attempt_started or ledger.gap_from,
            cause=ledger.attempt_cause,
            ended=True,
            completed=finished,
        )
        span = share.end - (ledger.attempt_started or ledger.gap_from)
        ledger = ledger.model_copy(
            update={
                "wall_seconds": ledger.wall_seconds + span,
                "productive_seconds": ledger.productive_seconds + share.productive,
                "badput_seconds": _add(ledger.badput_seconds, share.badput),
                "attempt": 0,
                "attempt_started": None,
                "gap_from": share.end,
            }
        )
    # Waits and suspensions between attempts, as they begin and end.
    for flag, since, total in (
        (_waiting(status), "waiting_from", "gap_waiting_seconds"),
        (status.phase == Phase.SUSPENDED, "suspended_from", "gap_suspended_seconds"),
    ):
        began = getattr(ledger, since)
        if flag and began is None:
            ledger = ledger.model_copy(update={since: now})
        elif not flag and began is not None:
            spent = getattr(ledger, total) + max(now - began, 0.0)
            ledger = ledger.model_copy(update={since: None, total: spent})
    # A new attempt started: the time since the last one's known work is its start-up.
    if status.attempt and status.attempt != ledger.attempt and not terminal:
        start = status.attempt_started_at.timestamp() if status.attempt_started_at else now
        cause = _cause(ledger, status)
        waited, paused = ledger.gap_waiting_seconds, ledger.gap_suspended_seconds
        gap = max(start - ledger.gap_from - waited - paused, 0.0)
        charged = {cause: gap, "waiting_for_workers": waited}
        ledger = ledger.model_copy(
            update={
                "wall_seconds": ledger.wall_seconds + gap + waited,
                "badput_seconds": _add(ledger.badput_seconds, charged),
                "attempts": ledger.attempts + 1,
                "attempt": status.attempt,
                "attempt_stage": _stage(status),
                "attempt_cause": cause,
                "attempt_started": start,
                "gap_from": start,
                "gap_waiting_seconds": 0.0,
                "gap_suspended_seconds": 0.0,
            }
        )
    update["goodput"] = ledger
    update["usage"] = _usage_of(ledger.attempt, usage, previous.usage) if ledger.attempt else None
    return status.model_copy(update=update)


def goodput(status: JobStatus, *, now: float) -> Goodput | None:
    """The job's figures: what the ledger holds, the running attempt's share so far (its
    steps provisionally productive), and a wait under way."""
    ledger = status.goodput
    if ledger is None:
        return None
    wall, productive = ledger.wall_seconds, ledger.productive_seconds
    badput = _add(ledger.badput_seconds, {})
    if ledger.attempt and ledger.attempt_started is not None:
        share = attempt_share(
            status.usage,
            started=ledger.attempt_started,
            cause=ledger.attempt_cause,
            ended=False,
            completed=False,
        )
        wall += share.end - ledger.attempt_started
        productive += share.productive
        badput = _add(badput, share.badput)
    waited = ledger.gap_waiting_seconds
    if ledger.waiting_from is not None:
        waited += max(now - ledger.waiting_from, 0.0)
    badput["waiting_for_workers"] += waited
    return Goodput(wall=wall + waited, productive=productive, badput=badput)
