"""The job's state machine: ``plan(spec, status, observed, now) -> Plan``. Pure.

Level-triggered: everything is derived from the spec, the last status and what the backend
sees now, so running it twice, or after an operator restart, decides the same thing.

Decisions, in order: terminal phases stay put; suspend stops everything; a stage whose
workers all reported completion moves to the next stage (or Succeeded); a permanent trainer
error fails the job; a lost or failed worker restarts the group on the workers that remain
(at the largest world size that keeps the global batch exact, >= the minimum) or waits for
capacity, with a doubling back-off; more capacity grows the group after a cool-down; otherwise
the group keeps running. Resizes do not count against ``maxRestarts``; failures do.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pretrain_trainer.contract import ExitCode

from ..api import (
    ConditionType,
    JobStatus,
    Phase,
    PretrainJobSpec,
    Reason,
    RestartsStatus,
    StageRecord,
    StageStatus,
    WorkersStatus,
    set_condition,
)
from .model import FAILURES, Event, Group, Observed, Plan, Worker, WorkerState

WAIT_SECONDS = 5.0  # how often to look again while waiting for capacity


_PHASE_CONDITION = {
    Phase.RUNNING: ConditionType.RUNNING,
    Phase.RESTARTING: ConditionType.RESTARTING,
    Phase.SUSPENDED: ConditionType.SUSPENDED,
}


def _counted(status: JobStatus, reason: Reason) -> JobStatus:
    """``status`` with one more restart for ``reason``."""
    by_reason = dict(status.restarts.by_reason)
    by_reason[reason] = by_reason.get(reason, 0) + 1
    restarts = RestartsStatus(total=status.restarts.total + 1, by_reason=by_reason)
    return status.model_copy(update={"restarts": restarts})


def _phase(
    status: JobStatus, phase: Phase, reason: Reason, message: str, now: datetime
) -> JobStatus:
    conditions = list(status.conditions)
    wanted = _PHASE_CONDITION.get(phase)
    for type_ in _PHASE_CONDITION.values():
        if any(c.type == type_ for c in conditions) or wanted == type_:
            conditions = set_condition(
                conditions,
                type_=type_,
                reason=reason,
                message=message,
                now=now,
                true=wanted == type_,
            )
    if phase == Phase.PENDING:  # not running yet, and the condition says why
        conditions = set_condition(
            conditions,
            type_=ConditionType.RUNNING,
            reason=reason,
            message=message,
            now=now,
            true=False,
        )
    if phase in (Phase.SUCCEEDED, Phase.FAILED):
        type_ = ConditionType.SUCCEEDED if phase == Phase.SUCCEEDED else ConditionType.FAILED
        conditions = set_condition(conditions, type_=type_, reason=reason, message=message, now=now)
    return status.model_copy(update={"phase": phase, "conditions": conditions})


def choose_world(spec: PretrainJobSpec, stage: int, available: int) -> int | None:
    """The largest usable worker count (global batch exact, within bounds) <= available."""
    counts = spec.worker_counts(spec.stages[stage])
    fitting = [n for n in counts.usable if n <= available]
    return max(fitting) if fitting else None


def _start(
    spec: PretrainJobSpec,
    status: JobStatus,
    observed: Observed,
    *,
    stage: int,
    now: datetime,
    reason: Reason,
    message: str,
    events: list[Event],
) -> Plan:
    """A new attempt of ``stage`` on the available slots, or wait for capacity."""
    available = observed.available()
    world = choose_world(spec, stage, len(available))
    if world is None:
        counts = spec.worker_counts(spec.stages[stage])
        waiting = (
            f"{len(available)} worker(s) available; stage {spec.stages[stage].name} needs one "
            f"of {', '.join(map(str, counts.usable))}"
        )
        status = status.model_copy(
            update={"workers": WorkersStatus(desired=counts.usable[0], ready=len(available))}
        )
        status = _phase(
            status,
            Phase.PENDING if status.attempt == 0 else Phase.RESTARTING,
            Reason.WAITING_FOR_WORKERS,
            waiting,
            now,
        )
        return Plan(
            group=None,
            status=status,
            events=tuple(events),
            stop=_running_slots(observed),
            requeue_after=WAIT_SECONDS,
        )
    coming = [
        w.slot for w in observed.workers if w.state == WorkerState.PENDING and w.attempt is None
    ]
    more = choose_world(spec, stage, len(available) + len(coming))
    if more is not None and more > world:  # capacity on its way (pods being scheduled)
        since = status.waiting_since or now
        patience = timedelta(seconds=spec.elastic.scale_up_cooldown_seconds)
        if now - since < patience:
            status = _phase(
                status.model_copy(update={"waiting_since": since}),
                Phase.PENDING if status.attempt == 0 else Phase.RESTARTING,
                Reason.WAITING_FOR_WORKERS,
                f"{len(available)} worker(s) ready and {len(coming)} being scheduled; waiting "
                f"up to {patience.total_seconds():g}s to start {more} instead of {world}",
                now,
            )
            left = (since + patience - now).total_seconds()
            return Plan(
                group=None,
                status=status,
                events=tuple(events),
                requeue_after=min(WAIT_SECONDS, left),
            )
    attempt = status.attempt + 1
    group = Group(stage=stage, attempt=attempt, slots=tuple(available[:world]))
    stage_status = status.stage
    if stage_status is None or stage_status.index != stage:
        stage_status = StageStatus(index=stage, name=spec.stages[stage].name, started_at=now)
    status = status.model_copy(
        update={
            "attempt": attempt,
            "attempt_started_at": now,
            "waiting_since": None,
            "stage": stage_status,
            "workers": WorkersStatus(desired=world, ready=0, slots=list(group.slots)),
        }
    )
    phase = (
        Phase.RUNNING if reason in (Reason.CREATED, Reason.STAGE_COMPLETED) else Phase.RESTARTING
    )
    status = _phase(status, phase, reason, message, now)
    events.append(Event(reason, message, warning=reason in FAILURES))
    stop = tuple(
        w.slot
        for w in observed.workers
        if w.state == WorkerState.RUNNING and w.attempt not in (None, attempt)
    )
    return Plan(group=group, status=status, events=tuple(events), stop=stop)


def _running_slots(observed: Observed) -> tuple[int, ...]:
    return tuple(w.slot for w in observed.workers if w.state == WorkerState.RUNNING and w.attempt)


def _broken(status: JobStatus, current: list[Worker]) -> tuple[Reason, str] | None:
    """Why the current group cannot go on, if it cannot."""
    seen = {w.slot for w in current}
    for slot in status.workers.slots:
        if slot not in seen:
            return Reason.WORKER_LOST, f"worker {slot} is gone"
    # A loss explains the failures it causes (survivors exit when a peer dies): name it first.
    for w in sorted(current, key=lambda w: w.state != WorkerState.LOST):
        if w.state == WorkerState.LOST:
            why = f" ({w.reason})" if w.reason else ""
            preempted = (w.reason or "").lower() in ("preempted", "disruptiontarget", "evicted")
            reason = Reason.PREEMPTED if preempted else Reason.WORKER_LOST
            return reason, f"worker {w.slot} lost{why}"
        if w.state == WorkerState.FAILED:
            return Reason.WORKER_FAILED, f"worker {w.slot} exited with code {w.exit_code}"
    return None


def _stuck(
    spec: PretrainJobSpec, status: JobStatus, current: list[Worker], now: datetime
) -> tuple[Reason, str] | None:
    """A worker of the current attempt that has not started within the start timeout."""
    limit = spec.elastic.start_timeout_seconds
    started = status.attempt_started_at
    if started is None or (now - started).total_seconds() <= limit:
        return None
    pending = [w.slot for w in current if w.state == WorkerState.PENDING]
    if not pending:
        return None
    return Reason.WORKER_LOST, f"worker {pending[0]} did not start within {limit:g}s"


def plan(spec: PretrainJobSpec, status: JobStatus, observed: Observed, now: datetime) -> Plan:
    if status.phase in (Phase.SUCCEEDED, Phase.FAILED):
        return Plan(group=None, status=status, stop=_running_slots(observed))
    if spec.suspend:
        suspended = _phase(
            status,
            Phase.SUSPENDED,
            Reason.SUSPENDED,
            "suspended: workers stopped, checkpoints kept",
            now,
        )
        said = (Event(Reason.SUSPENDED, "job suspended"),)
        return Plan(
            group=None,
            status=suspended,
            events=said if status.phase != Phase.SUSPENDED else (),
            stop=_running_slots(observed),
        )
    stage = status.stage.index if status.stage is not None else 0
    events: list[Event] = []
    if status.phase == Phase.SUSPENDED:
        events.append(Event(Reason.RESUMED, "job resumed"))
    if status.attempt == 0 or status.phase == Phase.SUSPENDED or not status.workers.slots:
        if status.next_attempt_at is not None and now < status.next_attempt_at:
            wait = (status.next_attempt_at - now).total_seconds()
            return Plan(group=None, status=status, events=tuple(events), requeue_after=wait)
        reason = (
            Reason.RESUMED
            if status.phase == Phase.SUSPENDED
            else Reason.CREATED
            if status.attempt == 0
            else Reason.RESTARTED
        )
        return _start(
            spec,
            status,
            observed,
            stage=stage,
            now=now,
            reason=reason,
            message=f"starting stage {spec.stages[stage].name}",
            events=events,
        )

    current = observed.of_attempt(status.attempt)
    done = [w for w in current if w.state == WorkerState.SUCCEEDED and w.report is not None]
    if current and done and all(w.state == WorkerState.SUCCEEDED for w in current):
        return _stage_completed(spec, status, observed, done[0], stage, now, events)
    permanent = [
        w for w in current if w.state == WorkerState.FAILED and w.exit_code == ExitCode.PERMANENT
    ]
    if permanent:
        told = next((w.reason for w in permanent if w.reason), None)
        message = (
            f"the trainer reported a permanent error: {told}"
            if told
            else "the trainer reported a permanent error (bad configuration, data or storage)"
        )
        failed = _phase(status, Phase.FAILED, Reason.PERMANENT_ERROR, message, now)
        return Plan(
            group=None,
            status=failed,
            stop=_running_slots(observed),
            events=(Event(Reason.PERMANENT_ERROR, message, warning=True),),
        )

    broken = _broken(status, current) or _stuck(spec, status, current, now)
    if broken is not None:
        return _restart(spec, status, observed, stage, now, *broken, events=events)

    running = [w for w in current if w.state == WorkerState.RUNNING]
    status = status.model_copy(
        update={"workers": status.workers.model_copy(update={"ready": len(running)})}
    )
    grown = _maybe_grow(spec, status, observed, stage, now, events)
    if grown is not None:
        return grown
    if len(running) == status.workers.desired:
        status = _phase(
            status,
            Phase.RUNNING,
            Reason.RUNNING,
            f"{len(running)} worker(s) training stage {spec.stages[stage].name}",
            now,
        )
    cooldown = spec.elastic.scale_up_cooldown_seconds
    return Plan(
        group=Group(stage, status.attempt, tuple(status.workers.slots)),
        status=status,
        events=tuple(events),
        requeue_after=cooldown or None,
    )


def _stage_completed(
    spec: PretrainJobSpec,
    status: JobStatus,
    observed: Observed,
    worker: Worker,
    stage: int,
    now: datetime,
    events: list[Event],
) -> Plan:
    report = worker.report
    assert report is not None  # guarded by the caller; not API data
    started = status.stage.started_at if status.stage is not None else None
    record = StageRecord(
        index=stage,
        name=spec.stages[stage].name,
        started_at=started,
        finished_at=now,
        step=report.step,
        tokens=report.tokens,
        loss=report.loss,
        checkpoint=report.checkpoint,
    )
    history = [r for r in status.stages if r.index != stage] + [record]
    status = status.model_copy(
        update={
            "stages": history,
            "step": report.step,
            "tokens": report.tokens,
            "loss": report.loss,
            "failures_in_a_row": 0,
        }
    )
    message = f"stage {spec.stages[stage].name} finished at step {report.step}"
    if stage + 1 == len(spec.stages):
        events.append(Event(Reason.STAGE_COMPLETED, message))
        status = status.model_copy(update={"workers": WorkersStatus()})
        status = _phase(status, Phase.SUCCEEDED, Reason.SUCCEEDED, "all stages finished", now)
        events.append(Event(Reason.SUCCEEDED, "all stages finished"))
        return Plan(group=None, status=status, events=tuple(events))
    return _start(
        spec,
        status,
        observed,
        stage=stage + 1,
        now=now,
        reason=Reason.STAGE_COMPLETED,
        message=message + f"; starting {spec.stages[stage + 1].name}",
        events=events,
    )


def _restart(
    spec: PretrainJobSpec,
    status: JobStatus,
    observed: Observed,
    stage: int,
    now: datetime,
    reason: Reason,
    why: str,
    *,
    events: list[Event],
) -> Plan:
    status = _counted(status, reason)
    failures = sum(v for k, v in status.restarts.by_reason.items() if k != Reason.RESIZED)
    if failures > spec.elastic.max_restarts:
        message = f"{why}; more than maxRestarts ({spec.elastic.max_restarts}) restarts"
        failed = _phase(status, Phase.FAILED, Reason.RESTART_LIMIT_EXCEEDED, message, now)
        return Plan(
            group=None,
            status=failed,
            stop=_running_slots(observed),
            events=(*events, Event(Reason.RESTART_LIMIT_EXCEEDED, message, warning=True)),
        )
    in_a_row = status.failures_in_a_row + 1
    backoff = spec.elastic.restart_backoff_seconds * 2 ** (in_a_row - 1)
    status = status.model_copy(
        update={
            "failures_in_a_row": in_a_row,
            "next_attempt_at": now + timedelta(seconds=backoff),
            "workers": status.workers.model_copy(update={"slots": []}),
        }
    )
    status = _phase(status, Phase.RESTARTING, reason, f"{why}; restarting in {backoff:g}s", now)
    events.append(Event(reason, f"{why}; restarting from the newest checkpoint", warning=True))
    return Plan(
        group=None,
        status=status,
        events=tuple(events),
        stop=_running_slots(observed),
        requeue_after=backoff,
    )


def _maybe_grow(
    spec: PretrainJobSpec,
    status: JobStatus,
    observed: Observed,
    stage: int,
    now: datetime,
    events: list[Event],
) -> Plan | None:
    """A larger group when capacity came back and the cool-down since the last start passed."""
    world = choose_world(spec, stage, len(observed.available()))
    if world is None or world <= status.workers.desired:
        return None
    started = status.attempt_started_at
    cooldown = timedelta(seconds=spec.elastic.scale_up_cooldown_seconds)
    if started is not None and now - started < cooldown:
        return None
    status = _counted(status, Reason.RESIZED).model_copy(update={"failures_in_a_row": 0})
    message = f"capacity for {world} workers (from {status.workers.desired}); resizing"
    return _start(
        spec,
        status,
        observed,
        stage=stage,
        now=now,
        reason=Reason.RESIZED,
        message=message,
        events=events,
    )
