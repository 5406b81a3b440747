"""Every recovery split into its phases, for both backends. Pure.

A recovery runs from a worker's loss to the first step of the attempt after it. Its moments
come from three places: the backend (when the loss happened, when each new worker was bound),
the planner (when the loss was noticed, when the next attempt's workers were created) and the
trainer (:class:`~pretrain_operator.api.TrainerUsage`: launcher up, process group, engine,
restore, first step). Consecutive moments give the phases (``RecoveryPhases``): detect,
back-off, schedule, start, rendezvous, init, restore, first step; the restore is the trainer's
own measure of it (part of it runs before the engine is built), init the rest of the time from
the process group to the restore's end. A moment reported earlier
than the one before it (clocks of different machines) counts as that one, so the phases are
never negative and always add up to the total.

:func:`track` carries a recovery under way (``status.recovering``) one pass on, and closes it
into ``status.lastRecovery`` and the histograms of ``status.recoveries`` at its first step.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from ..api import (
    JobStatus,
    Phase,
    RecoveringStatus,
    RecoveryHistory,
    RecoveryPhases,
    RecoveryStatus,
    TrainerUsage,
)
from ..plan import FAILURES, Event, Observed, WorkerState

PHASES = tuple(RecoveryPhases.model_fields)
BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Histogram bounds (seconds) for every phase and the total."""
TOTAL = "total"
DEFAULT_BUDGETS = {
    "detect": 60.0,  # a node's loss: the node lifecycle controller's 40 s grace, and a pass
    "backoff": 60.0,
    "schedule": 120.0,
    "start": 120.0,  # image already on the node; a pull on a cold node costs more
    "rendezvous": 120.0,
    "init": 120.0,
    "restore": 180.0,
    "first_step": 60.0,
}
"""Seconds each phase may take before ``PretrainJobRecoveryPhaseOverBudget`` fires; together
well under the five minutes a restore is promised to take (the chart's ``recoveryBudgets``)."""


def phases(recovering: RecoveringStatus, usage: TrainerUsage) -> RecoveryPhases:
    """The phases between the moments known of one recovery."""
    started = recovering.started_at or recovering.noticed_at
    moments = [
        recovering.lost_at,
        recovering.noticed_at,
        started,
        recovering.bound_at or started,
        usage.launcher_time,
        usage.group_time,
        usage.engine_time,
        usage.restored_time,
        usage.first_step_time,
    ]
    chain: list[float] = []
    for moment in moments:
        previous = chain[-1] if chain else recovering.lost_at
        chain.append(max(moment if moment is not None else previous, previous))
    spans = dict(zip(PHASES, (b - a for a, b in itertools.pairwise(chain)), strict=True))
    # Part of a restore happens before the engine exists (verifying the checkpoint, loading a
    # new stage's weights, converting to the universal format): the trainer's own measure of
    # it is the restore phase, and the rest of the span from the process group is init.
    built = spans["init"] + spans["restore"]
    spans["restore"] = min(usage.restore_seconds, built)
    spans["init"] = built - spans["restore"]
    return RecoveryPhases(**spans)


def observe(history: RecoveryHistory, recovery: RecoveryStatus) -> RecoveryHistory:
    """``history`` with one more recovery in its histograms."""
    seconds = {**recovery.phases.model_dump(), TOTAL: recovery.total_seconds}
    sums = {k: history.sums.get(k, 0.0) + v for k, v in seconds.items()}
    buckets = {}
    for key, value in seconds.items():
        counts = history.buckets.get(key) or [0] * len(BUCKETS)
        buckets[key] = [c + (value <= bound) for c, bound in zip(counts, BUCKETS, strict=True)]
    return RecoveryHistory(count=history.count + 1, sums=sums, buckets=buckets)


def track(
    previous: JobStatus,
    status: JobStatus,
    *,
    events: tuple[Event, ...],
    observed: Observed,
    now: float,
) -> JobStatus:
    """``status`` with its recovery under way carried on: begun when the planner reports a
    loss, given its attempt when the next one starts, its workers' binding as they bind, and
    closed at that attempt's first step (``status.usage``). A job that stops (suspended, or
    over) ends the recovery unmeasured."""
    recovering = status.recovering
    if status.phase in (Phase.SUSPENDED, Phase.SUCCEEDED, Phase.FAILED):
        return status.model_copy(update={"recovering": None}) if recovering else status
    loss = next((e for e in events if e.reason in FAILURES), None)
    if loss is not None and recovering is None:
        ended = [
            w.ended_at
            for w in observed.of_attempt(previous.attempt)
            if w.state in (WorkerState.LOST, WorkerState.FAILED) and w.ended_at is not None
        ]
        lost = min([*ended, now])
        recovering = RecoveringStatus(reason=loss.reason, lost_at=lost, noticed_at=now)
    if recovering is None:
        return status
    if status.attempt != previous.attempt and status.attempt:
        started = status.attempt_started_at.timestamp() if status.attempt_started_at else now
        recovering = recovering.model_copy(
            update={"attempt": status.attempt, "started_at": started, "bound_at": None}
        )
    if recovering.attempt == status.attempt:
        bound = [w.bound_at for w in observed.of_attempt(status.attempt) if w.bound_at]
        if bound:
            latest = max([*bound, recovering.bound_at or 0.0])
            recovering = recovering.model_copy(update={"bound_at": latest})
        usage = status.usage
        if usage is not None and usage.attempt == status.attempt and usage.first_step_time:
            return _close(status, recovering, usage)
    return status.model_copy(update={"recovering": recovering})


def _close(status: JobStatus, recovering: RecoveringStatus, usage: TrainerUsage) -> JobStatus:
    split = phases(recovering, usage)
    total = sum(split.model_dump().values())
    recovery = RecoveryStatus(
        reason=recovering.reason,
        lost_at=datetime.fromtimestamp(recovering.lost_at, UTC),
        attempt=status.attempt,
        total_seconds=total,
        phases=split,
    )
    return status.model_copy(
        update={
            "recovering": None,
            "last_recovery": recovery,
            "last_recovery_seconds": round(total, 3),
            "recoveries": observe(status.recoveries, recovery),
        }
    )
