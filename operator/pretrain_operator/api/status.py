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
from pretrain_trainer.contract import Usage as TrainerUsage
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
    EXPORTING = "Exporting"
    EXPORT_FAILED = "ExportFailed"


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
    eval_loss: dict[str, float] | None = None
    """Held-out loss per token on each of data.evalSources at the stage's end."""
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


class ExportStatus(Status):
    """The export of the trained model (spec.export)."""

    checkpoint: str
    """The checkpoint exported: the last stage's final one."""
    path: str
    """Where the export is (complete once finishedAt is set)."""
    format: str
    """The export's format (hf)."""
    dtype: str = "fp32"
    """The weights' type in it."""
    attempt: int = 1
    """Tries so far; a lost export pod is tried again, up to three times."""
    started_at: datetime | None = None
    """When the export began."""
    finished_at: datetime | None = None
    """When the export was complete."""


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


class GoodputStatus(Status):
    """Where the job's wall time went (``telemetry.goodput``), as the attempts already over and
    the time between them left it; the running attempt's share comes from ``usage``. Kept in
    the status so the figures survive an operator restart; its sums never go down."""

    started: float
    """When accounting began: the job's first pass (Unix time)."""
    ratio: float | None = None
    """Goodput as of the last status write: productive time over wall time (``kubectl get ptj
    -o wide``; the series ``pretrainjob_goodput_ratio`` is computed at each scrape)."""
    wall_seconds: float = 0.0
    """Wall time accounted (suspensions excluded)."""
    productive_seconds: float = 0.0
    """Inside steps whose result survived."""
    badput_seconds: dict[str, float] = {}
    """Wall time lost, by reason (restart, restore, checkpoint_blocking, evaluation,
    stage_transition, waiting_for_workers, startup, other)."""
    attempts: int = 0
    """Attempts accounted so far."""
    attempt: int = 0
    """The attempt being accounted now (0: none runs)."""
    attempt_stage: int = 0
    """The stage it trains."""
    attempt_cause: str = "startup"
    """What its start-up is charged to: startup, restart or stage_transition."""
    attempt_started: float | None = None
    """When it started (Unix time)."""
    attempt_stopped: float | None = None
    """When the planner saw it fail or stopped it (Unix time), while that is unfolded."""
    gap_from: float = 0.0
    """Where the time not yet charged begins: the end of the last attempt's known work."""
    pending: TrainerUsage | None = None
    """The last attempt a failure or resize ended, until the next one says where it resumed:
    which of its steps survived."""
    pending_stage: int = 0
    """Its stage."""
    pending_seconds: float = 0.0
    """Its seconds inside steps, productive or lost once settled."""
    gap_waiting_seconds: float = 0.0
    """Waiting for workers since ``gapFrom``."""
    gap_suspended_seconds: float = 0.0
    """Suspended since ``gapFrom``."""
    waiting_from: float | None = None
    """Since when the job waits for workers, while it does."""
    suspended_from: float | None = None
    """Since when the job is suspended, while it is."""


class RecoveryPhases(Status):
    """A recovery's phases in seconds; they add up to its total."""

    detect: float = 0.0
    """The loss happened -> the control plane noticed it."""
    backoff: float = 0.0
    """Noticed -> the next attempt's workers were created (restart back-off, waits)."""
    schedule: float = 0.0
    """Created -> the last of them bound to a node (the scheduler)."""
    start: float = 0.0
    """Bound -> the last launcher up (image, container, process start)."""
    rendezvous: float = 0.0
    """Launcher up -> every rank in the process group (the launcher's rendezvous, the trainer
    process's start and imports, the group's connection)."""
    init: float = 0.0
    """Process group -> model and DeepSpeed engine built (less the restore's share)."""
    restore: float = 0.0
    """The checkpoint read, verified and loaded (the trainer's measure; part of it runs before
    the engine is built)."""
    first_step: float = 0.0
    """Loaded -> the first step done."""


class RecoveryStatus(Status):
    """One recovery: from a worker's loss to the first step after it."""

    reason: str
    """Why workers were lost (WorkerLost, WorkerFailed, Preempted)."""
    lost_at: datetime
    """When the loss happened, as far as the cluster says (else when it was noticed)."""
    attempt: int
    """The attempt that recovered."""
    total_seconds: float
    """The loss -> the first step after it."""
    phases: RecoveryPhases
    """Where that time went."""


class RecoveringStatus(Status):
    """A recovery under way: what is known of it before its first step."""

    reason: str
    """Why workers were lost."""
    lost_at: float
    """When the loss happened (Unix time)."""
    noticed_at: float
    """When the control plane noticed it."""
    attempt: int | None = None
    """The attempt that recovers, once started."""
    started_at: float | None = None
    """When that attempt's workers were created."""
    bound_at: float | None = None
    """When the last of them was bound to a node."""


class RecoveryHistory(Status):
    """Every recovery's phases as cumulative histogram buckets (``telemetry.recovery``)."""

    count: int = 0
    """Recoveries so far."""
    sums: dict[str, float] = {}
    """Seconds per phase (and ``total``), summed over the recoveries."""
    buckets: dict[str, list[int]] = {}
    """Per phase (and ``total``): recoveries at or under each bucket bound."""


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
    export: ExportStatus | None = None
    """The trained model's export (spec.export), once the last stage finished."""
    last_recovery_seconds: float | None = None
    """Time from the last worker loss to training progressing again."""
    last_recovery: RecoveryStatus | None = None
    """The last recovery, phase by phase."""
    recovering: RecoveringStatus | None = None
    """A recovery under way."""
    recoveries: RecoveryHistory = RecoveryHistory()
    """Every recovery's phases, as histograms."""
    usage: TrainerUsage | None = None
    """What the current attempt's trainer has reported so far."""
    goodput: GoodputStatus | None = None
    """Where the job's wall time went."""


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
