"""What each pass adds to a job's status beyond the planner's decision, on both backends: the
goodput ledger (:mod:`.goodput`), the recovery under way (:mod:`.recovery`) and the newest
durable checkpoint, all from the trainer's usage. Pure."""

from __future__ import annotations

from datetime import UTC, datetime

from pretrain_trainer.ckpt.layout import checkpoint_name

from ..api import CheckpointStatus, JobStatus, Reason, TrainerUsage
from ..plan import FAILURES, Event, Observed
from .goodput import account, goodput
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
    finished = [
        w.report.usage
        for w in observed.of_attempt(previous.attempt)
        if w.report is not None and w.report.usage is not None
    ]
    reported = finished[0] if finished else None
    stopped = any(e.reason in (*FAILURES, Reason.SUSPENDED) for e in events)
    status = account(previous, status, usage=usage, now=now, reported=reported, stopped=stopped)
    status = track(previous, status, events=events, observed=observed, now=now)
    return with_checkpoint(with_ratio(status, now=now))


def with_ratio(status: JobStatus, *, now: float) -> JobStatus:
    """``status.goodput.ratio`` as of ``now``, to three places (a status write per change of
    a tenth of a percent at most)."""
    figures, ledger = goodput(status, now=now), status.goodput
    if figures is None or ledger is None or figures.wall <= 0:
        return status
    ratio = round(figures.ratio, 3)
    if ratio == ledger.ratio:
        return status
    return status.model_copy(update={"goodput": ledger.model_copy(update={"ratio": ratio})})


def with_checkpoint(status: JobStatus) -> JobStatus:
    """``status.lastCheckpoint`` following the newest checkpoint made durable: the one rank 0
    reports, or a finished stage's final one (its report says so, even when the stage ended
    before rank 0 was read again)."""
    found = [status.last_checkpoint] if status.last_checkpoint is not None else []
    usage, stage = status.usage, status.stage
    if usage is not None and usage.checkpoint_step is not None and stage is not None:
        saved = usage.checkpoint_time
        found.append(
            CheckpointStatus(
                stage=stage.index,
                step=usage.checkpoint_step,
                path=checkpoint_name(stage=stage.index, step=usage.checkpoint_step),
                saved_at=datetime.fromtimestamp(saved, UTC) if saved is not None else None,
            )
        )
    found += [
        CheckpointStatus(stage=r.index, step=r.step, path=r.checkpoint, saved_at=r.finished_at)
        for r in status.stages
        if r.checkpoint is not None and r.step is not None
    ]
    if not found:
        return status
    newest = max(found, key=lambda c: (c.stage, c.step))
    if newest == status.last_checkpoint:
        return status
    return status.model_copy(update={"last_checkpoint": newest})
