"""What each pass adds to a job's status beyond the planner's decision, on both backends: the
goodput ledger (:mod:`.goodput`), the recovery under way (:mod:`.recovery`) and the newest
durable checkpoint, all from the trainer's usage. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

from pretrain_trainer.ckpt.layout import checkpoint_name

from ..api import CheckpointStatus, JobStatus, TrainerUsage
from ..plan import Event, Observed
from .goodput import account
from .recovery import track


def accounted(
    previous: JobStatus,
    status: JobStatus,
    *,
    events: tuple[Event, ...],
    observed: Observed,
    usage: TrainerUsage | None,
    now: float,
) -> JobStatus:
    """``status`` (the planner's, from ``previous``) with this pass's accounting: ``usage``
    is what was read of the trainer this pass (None: nothing new)."""
    status = account(previous, status, usage=usage, now=now)
    status = track(previous, status, events=events, observed=observed, now=now)
    return with_checkpoint(status)


def with_checkpoint(status: JobStatus) -> JobStatus:
    """``status.lastCheckpoint`` following the newest checkpoint the trainer made durable."""
    usage, stage = status.usage, status.stage
    if usage is None or usage.checkpoint_step is None or stage is None:
        return status
    current, step = status.last_checkpoint, usage.checkpoint_step
    if current is not None and (current.stage, current.step) == (stage.index, step):
        return status
    saved = usage.checkpoint_time
    newest = CheckpointStatus(
        stage=stage.index,
        step=usage.checkpoint_step,
        path=checkpoint_name(stage=stage.index, step=usage.checkpoint_step),
        saved_at=datetime.fromtimestamp(saved, UTC) if saved is not None else None,
    )
    return status.model_copy(update={"last_checkpoint": newest})
