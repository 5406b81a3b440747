"""The PretrainJob status: written only by the operator, through the status subresource.

Status models ignore unknown keys (unlike specs): a status written by a newer or older
operator must still be readable, or an upgrade would lose the job's history.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pretrain_trainer.config import BatchSplit
from pretrain_trainer.contract import Loss
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class ConditionType(StrEnum):
    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Reason(StrEnum):
    """Condition and event reasons; a closed set so dashboards and alerts can rely on them."""

    INVALID_SPEC = "InvalidSpec"
    CREATED = "Created"
    RUNNING = "Running"
    WORKER_LOST = "WorkerLost"
    WORKER_FAILED = "WorkerFailed"
    PREEMPTED = "Preempted"
    RESIZED = "Resized"
    STAGE_COMPLETED = "StageCompleted"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    RESTARTED = "Restarted"
    SUCCEEDED = "Succeeded"
    RESTART_LIMIT_EXCEEDED = "RestartLimitExceeded"
    PERMANENT_ERROR = "PermanentError"
    WAITING_FOR_WORKERS = "WaitingForWorkers"


class Status(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
    )


class Condition(Status):
    """An observation of one aspect of the job (Kubernetes condition conventions)."""

    type: str
    """Condition type (Created, Running, Restarting, Suspended, Succeeded, Failed)."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str
    """Machine-readable reason (CamelCase constant)."""
    message: str = ""
    """Human-readable explanation."""
    last_transition_time: datetime | None = None
    """When the status last changed."""
    observed_generation: int | None = None
    """The spec generation this condition was computed from."""


class StageStatus(Status):
    """The stage being trained."""

    index: int
    """Position in spec.stages."""
    name: str
    """Stage name."""
    started_at: datetime | None = None
    """When the stage's first workers started."""


class StageRecord(Status):
    """What happened in one stage."""

    index: int
    """Position in spec.stages."""
    name: str
    """Stage name."""
    started_at: datetime | None = None
    """When the stage started."""
    finished_at: datetime | None = None
    """When its final checkpoint was reported."""
    step: int | None = None
    """Final optimizer step."""
    tokens: int | None = None
    """Tokens trained in the stage."""
    loss: Loss = None
    """Final training loss."""
    checkpoint: str | None = None
    """Path of the stage's final checkpoint."""


class MicroBatchesStatus(Status):
    """How the current attempt splits each global batch over its processes."""

    most: int
    """Micro-batches of the longest rank: what an optimizer step costs."""
    fewest: int
    """Micro-batches of the shortest rank (the same as ``most`` where the split is even)."""
    efficiency: float
    """Mean micro-batches per rank over ``most``: 1 where the world divides the batch."""

    @classmethod
    def of(cls, split: BatchSplit) -> MicroBatchesStatus:
        return cls(most=split.most, fewest=split.fewest, efficiency=round(split.efficiency, 4))


class WorkersStatus(Status):
    """Worker counts of the current attempt."""

    desired: int = 0
    """Workers the plan wants for the current attempt."""
    ready: int = 0
    """Workers running and joined."""
    slots: list[int] = []
    """Worker slots of the current attempt, in rank order."""
    micro_batches: MicroBatchesStatus | None = None
    """Micro-batches per rank at the current world size."""


class RestartsStatus(Status):
    """Group restarts since the job started."""

    total: int = 0
    """All restarts."""
    by_reason: dict[str, int] = {}
    """Restarts per reason (WorkerLost, WorkerFailed, Preempted, Resized, ...)."""


class CheckpointStatus(Status):
    """The newest checkpoint the trainer reported."""

    stage: int
    """Stage index."""
    step: int
    """Optimizer step."""
    path: str
    """Checkpoint directory."""
    saved_at: datetime | None = None
    """When it was completed."""
    verified: bool = False
    """Whether its manifest and checksums were verified."""


class JobStatus(Status):
    """Observed state of a PretrainJob."""

    phase: Phase = Phase.PENDING
    """Pending, Running, Restarting, Suspended, Succeeded or Failed."""
    conditions: Annotated[
        list[Condition],
        Field(
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            }
        ),
    ] = []
    """Latest observations, one per type."""
    observed_generation: int | None = None
    """The spec generation the status reflects."""
    stage: StageStatus | None = None
    """The current stage."""
    stages: list[StageRecord] = []
    """History of the stages started so far."""
    step: int | None = None
    """Latest optimizer step reported in the current stage."""
    tokens: int | None = None
    """Tokens trained in the current stage."""
    loss: Loss = None
    """Latest reported training loss."""
    eta: datetime | None = None
    """When the current stage should finish, at the recent step rate."""
    workers: WorkersStatus = WorkersStatus()
    """Workers of the current attempt."""
    attempt: int = 0
    """Attempt number; each group (re)start increments it."""
    attempt_started_at: datetime | None = None
    """When the current attempt's group was started."""
    next_attempt_at: datetime | None = None
    """Earliest time the next attempt may start (restart back-off)."""
    waiting_since: datetime | None = None
    """Since when a start has waited for capacity that is on its way (pods being scheduled)."""
    failures_in_a_row: int = 0
    """Consecutive failed attempts; the back-off doubles with each."""
    restarts: RestartsStatus = RestartsStatus()
    """Restart counts."""
    last_checkpoint: CheckpointStatus | None = None
    """Newest valid checkpoint."""
    last_recovery_seconds: float | None = None
    """Time from the last worker loss to training progressing again."""


def set_condition(
    conditions: list[Condition],
    *,
    type_: ConditionType,
    reason: Reason,
    message: str,
    now: datetime,
    true: bool = True,
) -> list[Condition]:
    """Conditions with one type set; its transition time moves only when its status does
    (Kubernetes condition conventions)."""
    status: Literal["True", "False"] = "True" if true else "False"
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(
        type=type_, status=status, reason=reason, message=message, last_transition_time=since
    )
    return [c for c in conditions if c.type != type_] + [new]
