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
- ``evaluation``: measuring the held-out loss (``data.evalSources``);
- ``stage_transition``: the same as ``restart`` for the attempt that starts the next stage;
- ``waiting_for_workers``: no group could run for lack of workers;
- ``startup``: the same for the job's first attempt;
- ``other``: the rest of an attempt's training loop (data, logging between steps).

A running attempt's steps count as productive until it ends; if it ends by a failure or a
resize, those the next attempt does not resume from (after the checkpoint it restores) move
to ``restart`` once it says where it resumed (or, if none does, those after the ended
attempt's own newest durable checkpoint). The wall time ends at
the last moment whose use is known (the running attempt's newest step, or the last start or
wait): the time after it is charged once the next report says how it was spent, so no bucket
ever shrinks (they are Prometheus counters).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..api import GoodputStatus, JobStatus, Phase, Reason, TrainerUsage

REASONS = (
    "restart",
    "restore",
    "checkpoint_blocking",
    "evaluation",
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
    """How one attempt used ``[started, end]``: its steps, and the rest by reason."""

    end: float
    steps: float
    badput: dict[str, float]


def attempt_share(usage: TrainerUsage | None, *, started: float, cause: str) -> _Share:
    """The use of an attempt's time from its start to its newest step."""
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
    # Evaluations lie inside the loop; the final save's blocking may end after its last step.
    evaluation = min(usage.eval_seconds, loop - steps)
    blocking = min(usage.blocking_seconds, loop - steps - evaluation)
    badput["checkpoint_blocking"] += blocking
    badput["evaluation"] += evaluation
    badput["other"] += loop - steps - blocking - evaluation
    return _Share(end, steps, badput)


def kept_seconds(usage: TrainerUsage, *, resumed: int | None, counted: float) -> float:
    """Of an ended attempt's ``counted`` step seconds, those whose result survived: the steps
    up to where the next attempt ``resumed`` (None: up to its own newest durable checkpoint).
    Between the points it reported (its start, that checkpoint, its last step) the seconds
    are spread evenly over the steps."""
    points = [(usage.resumed_step, 0.0)]
    checkpoint = usage.checkpoint_step
    if checkpoint is not None and usage.resumed_step < checkpoint <= usage.step:
        points.append((checkpoint, usage.checkpoint_step_seconds))
    points.append((usage.step, usage.step_seconds))
    target = resumed if resumed is not None else points[-2][0]
    if target <= points[0][0]:
        return 0.0
    for (a, seconds_a), (b, seconds_b) in itertools.pairwise(points):
        if target <= b:
            return min(seconds_a + (seconds_b - seconds_a) * (target - a) / (b - a), counted)
    return counted  # resumed at or past its last step: every step survived


def _settle(ledger: GoodputStatus, *, resumed: int | None) -> GoodputStatus:
    """The pending attempt's steps, split into productive and ``restart``."""
    if ledger.pending is None:
        return ledger
    counted = ledger.pending_seconds
    kept = kept_seconds(ledger.pending, resumed=resumed, counted=counted)
    return ledger.model_copy(
        update={
            "productive_seconds": ledger.productive_seconds + kept,
            "badput_seconds": _add(ledger.badput_seconds, {"restart": counted - kept}),
            "pending": None,
            "pending_seconds": 0.0,
        }
    )


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
    previous: JobStatus,
    status: JobStatus,
    *,
    usage: TrainerUsage | None,
    now: float,
    reported: TrainerUsage | None = None,
    stopped: bool = False,
) -> JobStatus:
    """``status`` (what the planner just decided from ``previous``) with the goodput ledger and
    the running attempt's ``usage`` (None: nothing new was read) carried one pass on.
    ``reported``: the usage a finished stage's report carries (whole, to its last step);
    ``stopped``: this pass saw the running attempt fail, or stopped it."""
    ledger = previous.goodput or GoodputStatus(started=now, gap_from=now)
    update: dict[str, object] = {}
    terminal = status.phase in (Phase.SUCCEEDED, Phase.FAILED)
    if ledger.attempt and stopped and ledger.attempt_stopped is None:
        ledger = ledger.model_copy(update={"attempt_stopped": now})
    # The attempt accounted so far is over: fold its share. A completed stage keeps every
    # step; after a failure or a resize, which steps survived is known once the next attempt
    # says where it resumed: until then they are pending.
    if ledger.attempt and (status.attempt != ledger.attempt or terminal):
        last = _usage_of(ledger.attempt, reported, usage, previous.usage)
        started = ledger.attempt_started or ledger.gap_from
        share = attempt_share(last, started=started, cause=ledger.attempt_cause)
        if share.end == started and ledger.attempt_stopped is not None:
            # It never reached a step: its time until it was stopped was its start-up.
            end = max(ledger.attempt_stopped, started)
            charged = _add(share.badput, {ledger.attempt_cause: end - started})
            share = _Share(end, 0.0, charged)
        completed = status.phase == Phase.SUCCEEDED or _stage(status) > ledger.attempt_stage
        ledger = _settle(ledger, resumed=None)  # an older one nobody resumed from
        ledger = ledger.model_copy(
            update={
                "wall_seconds": ledger.wall_seconds + share.end - started,
                "productive_seconds": ledger.productive_seconds + (share.steps if completed else 0),
                "badput_seconds": _add(ledger.badput_seconds, share.badput),
                "pending": None if completed else last,
                "pending_stage": ledger.attempt_stage,
                "pending_seconds": 0.0 if completed else share.steps,
                "attempt": 0,
                "attempt_started": None,
                "attempt_stopped": None,
                "gap_from": share.end,
            }
        )
    if terminal:
        ledger = _settle(ledger, resumed=None)
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
    current = _usage_of(ledger.attempt, usage, previous.usage) if ledger.attempt else None
    if ledger.pending is not None and current is not None and current.restored_time is not None:
        same = ledger.attempt_stage == ledger.pending_stage
        ledger = _settle(ledger, resumed=current.resumed_step if same else None)
    update["goodput"] = ledger
    update["usage"] = current
    return status.model_copy(update=update)


def goodput(status: JobStatus, *, now: float) -> Goodput | None:
    """The job's figures: what the ledger holds, the running attempt's share so far (its
    steps provisionally productive), and a wait under way."""
    ledger = status.goodput
    if ledger is None:
        return None
    wall, productive = ledger.wall_seconds, ledger.productive_seconds + ledger.pending_seconds
    badput = _add(ledger.badput_seconds, {})
    if ledger.attempt and ledger.attempt_started is not None:
        share = attempt_share(
            status.usage, started=ledger.attempt_started, cause=ledger.attempt_cause
        )
        wall += share.end - ledger.attempt_started
        productive += share.steps
        badput = _add(badput, share.badput)
    waited = ledger.gap_waiting_seconds
    if ledger.waiting_from is not None:
        waited += max(now - ledger.waiting_from, 0.0)
    badput["waiting_for_workers"] += waited
    return Goodput(wall=wall + waited, productive=productive, badput=badput)
