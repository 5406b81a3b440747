"""What the planner sees (workers, per slot) and what it decides (a group, stops, status).

A *slot* is a stable place a worker can run: a pod ordinal on Kubernetes, a worker id in the
local backend. A group is one attempt of one stage on some slots; a worker's rank is its
slot's index in the group. Backends translate their objects to :class:`Worker` values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from pretrain_trainer.contract import AgentState, FailureReport, StageReport, parse_report

from ..api import JobStatus, Reason

FAILURES = (Reason.WORKER_LOST, Reason.WORKER_FAILED, Reason.PREEMPTED)
"""Reasons that mean work was lost (a recovery starts), unlike a resize or a stage change."""


class WorkerState(StrEnum):
    IDLE = "Idle"  # ready to run a worker, runs none (a standby pod, a free local slot)
    PENDING = "Pending"  # exists but cannot run yet (no capacity) or is starting
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # exited 0
    FAILED = "Failed"  # exited non-zero
    LOST = "Lost"  # deleted, evicted, preempted, or its node is gone


@dataclass(frozen=True)
class Worker:
    slot: int
    state: WorkerState
    attempt: int | None = None  # the attempt it runs for; None for an idle, available slot
    stage: int | None = None
    exit_code: int | None = None
    reason: str | None = None  # why it was lost or failed, in the backend's words
    report: StageReport | None = None
    """The trainer's report of a finished stage (its termination message)."""
    bound_at: float | None = None
    """When it was placed where it runs (its pod bound to a node, its process started)."""
    ended_at: float | None = None
    """When it was lost or exited, as far as the backend knows (Unix time)."""


def exited(
    *,
    slot: int,
    attempt: int | None,
    stage: int | None,
    succeeded: bool,
    exit_code: int | None,
    report: StageReport | FailureReport | None,
) -> Worker:
    """The worker whose trainer exited, read from its report as either backend finds it.
    torchrun exits 1 whatever its worker's code was: a failure report has the trainer's own."""
    if succeeded:
        finished = report if isinstance(report, StageReport) else None
        return Worker(
            slot=slot,
            state=WorkerState.SUCCEEDED,
            attempt=attempt,
            stage=stage,
            exit_code=0,
            report=finished,
        )
    failure = report if isinstance(report, FailureReport) else None
    return Worker(
        slot=slot,
        state=WorkerState.FAILED,
        attempt=attempt,
        stage=stage,
        exit_code=failure.exit_code if failure is not None else exit_code,
        reason=failure.error if failure is not None else None,
    )


def agent_exited(slot: int, state: AgentState) -> Worker:
    """The worker whose attempt ended under its worker agent, as its state says (its exit
    code, its report, when it ended), on either backend."""
    code = state.exit_code if state.exit_code is not None else 1
    worker = exited(
        slot=slot,
        attempt=state.attempt,
        stage=state.stage,
        succeeded=code == 0,
        exit_code=code,
        report=parse_report(state.report),
    )
    return replace(worker, ended_at=state.ended_at)


@dataclass(frozen=True)
class ExportTask:
    """The export that should run (spec.export): one try of it."""

    checkpoint: str
    path: str
    format: str
    dtype: str
    attempt: int

    def arguments(self) -> list[str]:
        """The trainer's ``export`` command line after ``python -m pretrain_trainer``. A try
        after one that finished its work but was not seen to keeps what that one wrote."""
        return [
            "export",
            self.checkpoint,
            "--out",
            self.path,
            "--format",
            self.format,
            "--dtype",
            self.dtype,
            "--keep-existing",
        ]


@dataclass(frozen=True)
class ExportRun:
    """What a backend sees of one try of the export."""

    attempt: int
    state: WorkerState
    exit_code: int | None = None
    message: str | None = None
    """Why it failed, in its own words (its last line), where the backend has them."""


@dataclass(frozen=True)
class Observed:
    workers: tuple[Worker, ...] = ()
    export: ExportRun | None = None
    """The newest try of the export, if one was started."""

    def available(self) -> list[int]:
        """Slots that could run a worker right now."""
        ready = (WorkerState.IDLE, WorkerState.RUNNING, WorkerState.SUCCEEDED)
        return sorted({w.slot for w in self.workers if w.state in ready})

    def of_attempt(self, attempt: int) -> list[Worker]:
        return [w for w in self.workers if w.attempt == attempt]

    def running(self) -> tuple[int, ...]:
        """Slots running a worker of any attempt: what a plan that runs nothing stops."""
        return tuple(w.slot for w in self.workers if w.state == WorkerState.RUNNING and w.attempt)


@dataclass(frozen=True)
class Group:
    """The workers that should run: stage, attempt and slots in rank order."""

    stage: int
    attempt: int
    slots: tuple[int, ...]

    @property
    def world(self) -> int:
        return len(self.slots)


@dataclass(frozen=True)
class Event:
    """Something to tell whoever watches the job: a Kubernetes Event, a line of the local
    journal. Warnings are the events that mean work was lost or the job failed."""

    reason: Reason
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Plan:
    group: Group | None
    """What should be running; None stops everything."""
    status: JobStatus
    events: tuple[Event, ...] = ()
    stop: tuple[int, ...] = ()
    """Slots whose worker belongs to an older attempt and must stop."""
    requeue_after: float | None = None
    """Seconds until the planner should look again without any change."""
    export: ExportTask | None = None
    """The export that should run; None stops any."""

    def with_events(self, prefix: tuple[Event, ...]) -> Plan:
        """This plan with ``prefix`` said first: a step that decided something before handing
        over to another (a resume, then the start) keeps the order things happened in."""
        return replace(self, events=(*prefix, *self.events))
