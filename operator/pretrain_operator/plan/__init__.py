"""The pure planning core shared by the Kubernetes operator and the local backend.

Imports neither kopf nor kubernetes: ``plan()`` maps (spec, status, observed workers, now) to
the group that should run, the workers to stop, the status to write and the events to emit.
"""

from .core import plan
from .elastic import choose_world
from .model import (
    FAILURES,
    Event,
    ExportRun,
    ExportTask,
    Group,
    Observed,
    Plan,
    Worker,
    WorkerState,
    agent_exited,
    exited,
)

__all__ = [
    "FAILURES",
    "Event",
    "ExportRun",
    "ExportTask",
    "Group",
    "Observed",
    "Plan",
    "Worker",
    "WorkerState",
    "agent_exited",
    "choose_world",
    "exited",
    "plan",
]
