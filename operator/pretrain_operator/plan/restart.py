"""Why a group cannot go on, and what restarting it costs.

A group is broken when one of its workers is gone, lost, preempted or failed, and stuck when
a worker of a new attempt has not started within ``startTimeoutSeconds`` (a pod the scheduler
cannot place would otherwise stall the job). Either way the group stops and restarts from the
newest checkpoint after a back-off that doubles with each failure in a row, so a crash loop
slows down instead of hammering the cluster; more failures than ``maxRestarts`` fail the job.
Resizes are counted too, under Resized, but never against the limit: they lose no work. A
permanent trainer error (bad configuration, data or storage) fails the job at once, because
no restart would fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from pretrain_trainer.contract import ExitCode

from ..api import JobStatus, Phase, Reason, RestartsStatus
from .context import Pass
from .model import Event, Plan, Worker, WorkerState
from .phase import set_phase

_PREEMPTIONS = ("preempted", "disruptiontarget", "evicted")
"""The backends' words, lower-cased, for a worker taken away on purpose rather than broken."""


@dataclass(frozen=True)
class Fault:
    """Why the current group cannot go on: a reason among ``FAILURES`` and what happened."""

    reason: Reason
    message: str


def fault(ctx: Pass, status: JobStatus, current: list[Worker]) -> Fault | None:
    """The fault of the current attempt's workers, if any: broken first, then stuck."""
    return _broken(status, current) or _stuck(ctx, status, current)


def _broken(status: JobStatus, current: list[Worker]) -> Fault | None:
    """A worker of the group gone (its pod deleted), lost, preempted or failed."""
    seen = {w.slot for w in current}
    for slot in status.workers.slots:
        if slot not in seen:
            return Fault(Reason.WORKER_LOST, f"worker {slot} is gone")
    # A loss explains the failures it causes (survivors exit when a peer dies): name it first.
    for w in sorted(current, key=lambda w: w.state != WorkerState.LOST):
        if w.state == WorkerState.LOST:
            why = f" ({w.reason})" if w.reason else ""
            preempted = (w.reason or "").lower() in _PREEMPTIONS
            reason = Reason.PREEMPTED if preempted else Reason.WORKER_LOST
            return Fault(reason, f"worker {w.slot} lost{why}")
        if w.state == WorkerState.FAILED:
            return Fault(Reason.WORKER_FAILED, f"worker {w.slot} exited with code {w.exit_code}")
    return None


def _stuck(ctx: Pass, status: JobStatus, current: list[Worker]) -> Fault | None:
    """A worker of the attempt still pending after the start timeout: counted as lost, so a
    pod that cannot be placed gives way to a smaller group instead of stalling the job."""
    limit = ctx.spec.elastic.start_timeout_seconds
    started = status.attempt_started_at
    if started is None or (ctx.now - started).total_seconds() <= limit:
        return None
    pending = [w.slot for w in current if w.state == WorkerState.PENDING]
    if not pending:
        return None
    return Fault(Reason.WORKER_LOST, f"worker {pending[0]} did not start within {limit:g}s")


def counted(status: JobStatus, reason: Reason) -> JobStatus:
    """``status`` with one more restart for ``reason``."""
    by_reason = dict(status.restarts.by_reason)
    by_reason[reason] = by_reason.get(reason, 0) + 1
    restarts = RestartsStatus(total=status.restarts.total + 1, by_reason=by_reason)
    return status.model_copy(update={"restarts": restarts})


def restart(ctx: Pass, status: JobStatus, fault: Fault) -> Plan:
    """Stop the group and schedule the next attempt after the back-off, or fail the job when
    this failure is one more than ``maxRestarts``."""
    status = counted(status, fault.reason)
    limit = ctx.spec.elastic.max_restarts
    failures = sum(v for k, v in status.restarts.by_reason.items() if k != Reason.RESIZED)
    if failures > limit:
        message = f"{fault.message}; more than maxRestarts ({limit}) restarts"
        return _fail(ctx, status, reason=Reason.RESTART_LIMIT_EXCEEDED, message=message)
    in_a_row = status.failures_in_a_row + 1
    backoff = ctx.spec.elastic.restart_backoff_seconds * 2 ** (in_a_row - 1)
    status = status.model_copy(
        update={
            "failures_in_a_row": in_a_row,
            "next_attempt_at": ctx.now + timedelta(seconds=backoff),
            "workers": status.workers.model_copy(update={"slots": []}),
        }
    )
    message = f"{fault.message}; restarting in {backoff:g}s"
    status = set_phase(status, Phase.RESTARTING, reason=fault.reason, message=message, now=ctx.now)
    said = Event(
        fault.reason, f"{fault.message}; restarting from the newest checkpoint", warning=True
    )
    return Plan(
        group=None,
        status=status,
        events=(said,),
        stop=ctx.observed.running(),
        requeue_after=backoff,
    )


def permanent(ctx: Pass, status: JobStatus, current: list[Worker]) -> Plan | None:
    """The job failed, if a worker of the current attempt exited with the trainer's code for a
    permanent error."""
    told = [
        w for w in current if w.state == WorkerState.FAILED and w.exit_code == ExitCode.PERMANENT
    ]
    if not told:
        return None
    error = next((w.reason for w in told if w.reason), None)
    message = (
        f"the trainer reported a permanent error: {error}"
        if error
        else "the trainer reported a permanent error (bad configuration, data or storage)"
    )
    return _fail(ctx, status, reason=Reason.PERMANENT_ERROR, message=message)


def _fail(ctx: Pass, status: JobStatus, *, reason: Reason, message: str) -> Plan:
    failed = set_phase(status, Phase.FAILED, reason=reason, message=message, now=ctx.now)
    said = Event(reason, message, warning=True)
    return Plan(group=None, status=failed, stop=ctx.observed.running(), events=(said,))
