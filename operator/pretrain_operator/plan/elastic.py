"""How many workers a stage runs on, and when that number changes.

Every world size keeps the stage's global batch exact (an uneven split runs micro-batch
counts that differ by one between ranks), so a resize never changes what is trained.
``choose_world`` takes the count that trains fastest on the slots available now, and of those
as fast, the fewest (``WorkerCounts.best``): losing one node of 128 costs one node's worth,
not half the job. A start waits up to the cool-down when capacity is on its way (pods being
scheduled) and would make it faster, rather than starting slow and resizing a minute later. A
running group grows when capacity came back that makes it faster and the cool-down since its
start passed; that resize is counted under Resized, never against ``maxRestarts``, and resets
the failure streak.
"""

from __future__ import annotations

from datetime import timedelta

from ..api import (
    JobStatus,
    MicroBatchesStatus,
    Phase,
    PretrainJobSpec,
    Reason,
    StageStatus,
    WorkersStatus,
)
from .context import Pass
from .model import FAILURES, Event, Group, Plan, WorkerState
from .phase import set_phase
from .restart import counted

WAIT_SECONDS = 5.0  # how often to look again while waiting for capacity

_STARTED = (Reason.CREATED, Reason.STAGE_COMPLETED)
"""Starts that continue the run as planned; every other start is a restart of some kind."""


def choose_world(spec: PretrainJobSpec, *, stage: int, available: int) -> int | None:
    """The worker count to run on ``available`` slots (``WorkerCounts.best``), or None."""
    return spec.worker_counts(spec.stages[stage]).best(available)


def start(ctx: Pass, status: JobStatus, *, reason: Reason, message: str) -> Plan:
    """A new attempt of the pass's stage on the available slots, or a wait for capacity."""
    available = ctx.observed.available()
    world = choose_world(ctx.spec, stage=ctx.stage, available=len(available))
    if world is None:
        return _too_few(ctx, status, available)
    coming = _coming(ctx, status, available=available, world=world)
    if coming is not None:
        return coming
    attempt = status.attempt + 1
    group = Group(stage=ctx.stage, attempt=attempt, slots=tuple(available[:world]))
    stage_status = status.stage
    if stage_status is None or stage_status.index != ctx.stage:
        stage_status = StageStatus(index=ctx.stage, name=ctx.stage_name, started_at=ctx.now)
    status = status.model_copy(
        update={
            "attempt": attempt,
            "attempt_started_at": ctx.now,
            "waiting_since": None,
            "stage": stage_status,
            "workers": WorkersStatus(
                desired=world,
                ready=0,
                slots=list(group.slots),
                micro_batches=MicroBatchesStatus.of(
                    ctx.spec.worker_counts(ctx.spec.stages[ctx.stage]).split(world)
                ),
            ),
        }
    )
    phase = Phase.RUNNING if reason in _STARTED else Phase.RESTARTING
    status = set_phase(status, phase, reason=reason, message=message, now=ctx.now)
    stop = tuple(
        w.slot
        for w in ctx.observed.workers
        if w.state == WorkerState.RUNNING and w.attempt not in (None, attempt)
    )
    said = Event(reason, message, warning=reason in FAILURES)
    return Plan(group=group, status=status, events=(said,), stop=stop)


def _too_few(ctx: Pass, status: JobStatus, available: list[int]) -> Plan:
    """Not even the smallest group fits: stop everything and look again soon."""
    counts = ctx.spec.worker_counts(ctx.spec.stages[ctx.stage])
    least = counts.usable[0] if counts.usable else counts.low  # the smallest the layout fits
    status = status.model_copy(
        update={"workers": WorkersStatus(desired=least, ready=len(available))}
    )
    message = f"{len(available)} worker(s) available; stage {ctx.stage_name} needs at least {least}"
    return Plan(
        group=None,
        status=_waiting(ctx, status, message),
        stop=ctx.observed.running(),
        requeue_after=WAIT_SECONDS,
    )


def _coming(ctx: Pass, status: JobStatus, *, available: list[int], world: int) -> Plan | None:
    """A wait, if slots being scheduled would allow a larger group than ``world`` and the
    cool-down since the wait began has not passed."""
    coming = [
        w.slot for w in ctx.observed.workers if w.state == WorkerState.PENDING and w.attempt is None
    ]
    more = choose_world(ctx.spec, stage=ctx.stage, available=len(available) + len(coming))
    if more is None or more <= world:
        return None
    since = status.waiting_since or ctx.now
    patience = timedelta(seconds=ctx.spec.elastic.scale_up_cooldown_seconds)
    if ctx.now - since >= patience:
        return None
    message = (
        f"{len(available)} worker(s) ready and {len(coming)} being scheduled; waiting "
        f"up to {patience.total_seconds():g}s to start {more} instead of {world}"
    )
    status = _waiting(ctx, status.model_copy(update={"waiting_since": since}), message)
    left = (since + patience - ctx.now).total_seconds()
    return Plan(group=None, status=status, requeue_after=min(WAIT_SECONDS, left))


def _waiting(ctx: Pass, status: JobStatus, message: str) -> JobStatus:
    """Pending before the first attempt, Restarting after one: waiting for workers."""
    phase = Phase.PENDING if status.attempt == 0 else Phase.RESTARTING
    return set_phase(status, phase, reason=Reason.WAITING_FOR_WORKERS, message=message, now=ctx.now)


def grow(ctx: Pass, status: JobStatus) -> Plan | None:
    """A larger group, if capacity came back that trains faster and the cool-down since the
    last start passed (more slots at the same speed change nothing: they stand by)."""
    world = choose_world(ctx.spec, stage=ctx.stage, available=len(ctx.observed.available()))
    if world is None or world <= status.workers.desired:
        return None
    started = status.attempt_started_at
    cooldown = timedelta(seconds=ctx.spec.elastic.scale_up_cooldown_seconds)
    if started is not None and ctx.now - started < cooldown:
        return None
    status = counted(status, Reason.RESIZED).model_copy(update={"failures_in_a_row": 0})
    message = f"capacity for {world} workers (from {status.workers.desired}); resizing"
    return start(ctx, status, reason=Reason.RESIZED, message=message)
