"""What the planner sees (workers, per slot) and what it decides (a group, stops, status).

A *slot* is a stable place a worker can run: a pod ordinal on Kubernetes, a worker id in the
local backend. A group is one attempt of one stage on some slots; a worker's rank is its
slot's index in the group. Backends translate their objects to :class:`Worker` values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ..api import JobStatus


class WorkerState(StrEnum):
    IDLE = "Idle"  # ready to run a worker, runs none (a standby pod, a free local slot)
    PENDING = "Pending"  # exists but cannot run yet (no capacity) or is starting
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # exited 0
    FAILED = "Failed"  # exited non-zero
    LOST = "Lost"  # deleted, evicted, preempted, or its node is gone


@dataclass(frozen=True)
class StageReport:
    """The trainer's report at the end of a stage (its termination message)."""

    stage: int
    step: int
    tokens: int
    loss: float | None
    checkpoint: str


@dataclass(frozen=True)
class Worker:
    slot: int
    state: WorkerState
    attempt: int | None = None  # the attempt it runs for; None for an idle, available slot
    stage: int | None = None
    exit_code: int | None = None
    reason: str | None = None  # why it was lost or failed, in the backend's words
    report: StageReport | None = None


@dataclass(frozen=True)
class Observed:
    workers: tuple[Worker, ...] = ()

    def available(self) -> list[int]:
        """Slots that could run a worker right now."""
        ready = (WorkerState.IDLE, WorkerState.RUNNING, WorkerState.SUCCEEDED)
        return sorted({w.slot for w in self.workers if w.state in ready})

    def of_attempt(self, attempt: int) -> list[Worker]:
        return [w for w in self.workers if w.attempt == attempt]


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
    reason: str
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
