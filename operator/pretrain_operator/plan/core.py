"""The job's state machine: ``plan(spec=, status=, observed=, now=) -> Plan``. Pure.

Level-triggered: everything is derived from the spec, the last status and what the backend
sees now, so running it twice, or after an operator restart, decides the same thing.

This module owns the order of the decisions; each policy lives in its own module. In order:
terminal phases stay put; suspend stops everything; a group starts when none runs (the first,
after a resume, after a restart's back-off: ``elastic``); a stage whose workers all reported
completion moves to the next stage or Succeeded (``stages``); a permanent trainer error fails
the job, and a lost, failed or stuck worker restarts the group (``restart``); more capacity
grows the group after a cool-down (``elastic``); otherwise the group keeps running.
"""

from __future__ import annotations

from datetime import datetime

from ..api import JobStatus, Phase, PretrainJobSpec, Reason
from . import elastic, exporting, restart, stages
from .context import Pass
from .model import Event, Group, Observed, Plan, Worker, WorkerState
from .phase import set_phase


def plan(*, spec: PretrainJobSpec, status: JobStatus, observed: Observed, now: datetime) -> Plan:
    """What should run, what must stop, the status to write and the events to emit."""
    if status.phase in (Phase.SUCCEEDED, Phase.FAILED):
        return Plan(group=None, status=status, stop=observed.running())
    stage = status.stage.index if status.stage is not None else 0
    ctx = Pass(spec=spec, observed=observed, now=now, stage=stage)
    if spec.suspend:
        return _suspend(ctx, status)
    if status.export is not None and status.export.finished_at is None:
        return exporting.proceed(ctx, status, status.export)
    if status.attempt == 0 or status.phase == Phase.SUSPENDED or not status.workers.slots:
        return _begin(ctx, status)
    current = observed.of_attempt(status.attempt)
    report = stages.finished(current)
    if report is not None:
        return stages.complete(ctx, status, report)
    failed = restart.permanent(ctx, status, current)
    if failed is not None:
        return failed
    fault = restart.fault(ctx, status, current)
    if fault is not None:
        return restart.restart(ctx, status, fault)
    return _keep_running(ctx, status, current)


def _suspend(ctx: Pass, status: JobStatus) -> Plan:
    """Every worker stops; the checkpoints stay, so a resume continues from the newest."""
    suspended = set_phase(
        status,
        Phase.SUSPENDED,
        reason=Reason.SUSPENDED,
        message="suspended: workers stopped, checkpoints kept",
        now=ctx.now,
    )
    said = (Event(Reason.SUSPENDED, "job suspended"),) if status.phase != Phase.SUSPENDED else ()
    return Plan(group=None, status=suspended, events=said, stop=ctx.observed.running())


def _begin(ctx: Pass, status: JobStatus) -> Plan:
    """No group runs: start one (the first, after a resume, or after a restart), unless the
    restart back-off has not passed yet."""
    resumed = status.phase == Phase.SUSPENDED
    said = (Event(Reason.RESUMED, "job resumed"),) if resumed else ()
    if status.next_attempt_at is not None and ctx.now < status.next_attempt_at:
        wait = (status.next_attempt_at - ctx.now).total_seconds()
        return Plan(group=None, status=status, events=said, requeue_after=wait)
    reason = (
        Reason.RESUMED if resumed else Reason.CREATED if status.attempt == 0 else Reason.RESTARTED
    )
    message = f"starting stage {ctx.stage_name}"
    return elastic.start(ctx, status, reason=reason, message=message).with_events(said)


def _keep_running(ctx: Pass, status: JobStatus, current: list[Worker]) -> Plan:
    """The group goes on, or grows; the status counts the workers that run."""
    running = [w for w in current if w.state == WorkerState.RUNNING]
    status = status.model_copy(
        update={"workers": status.workers.model_copy(update={"ready": len(running)})}
    )
    grown = elastic.grow(ctx, status)
    if grown is not None:
        return grown
    if len(running) == status.workers.desired:
        message = f"{len(running)} worker(s) training stage {ctx.stage_name}"
        status = set_phase(
            status, Phase.RUNNING, reason=Reason.RUNNING, message=message, now=ctx.now
        )
    cooldown = ctx.spec.elastic.scale_up_cooldown_seconds
    return Plan(
        group=Group(stage=ctx.stage, attempt=status.attempt, slots=tuple(status.workers.slots)),
        status=status,
        requeue_after=cooldown or None,
    )
