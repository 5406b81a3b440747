"""A running job's progress in its status (step, tokens, loss, the stage's ETA), from whatever
the backend reads of its trainer: rank 0's ``/metrics`` on Kubernetes, the step log locally.
Pure: one way to compute the ETA for both."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..api import JobStatus, Phase, PretrainJobSpec, TrainerUsage


@dataclass(frozen=True)
class TrainerProgress:
    """Where the trainer of the current stage is, and how fast it goes."""

    stage: int | None
    """The stage it trains; None when the source does not say (the metrics are per attempt)."""
    step: int
    tokens: int
    loss: float | None
    seconds_per_step: float | None
    """Recent wall time per step; None before two steps are known."""
    usage: TrainerUsage | None = None
    """The attempt's cumulative usage, where the source reports it."""


def with_progress(
    status: JobStatus, spec: PretrainJobSpec, progress: TrainerProgress, *, now: datetime
) -> JobStatus:
    """``status`` carrying ``progress`` and the stage's ETA at the measured step time, as of
    ``now`` (when the progress was read). Unchanged unless the job runs that stage."""
    if status.phase != Phase.RUNNING or status.stage is None:
        return status
    if progress.stage is not None and progress.stage != status.stage.index:
        return status
    total = spec.stages[status.stage.index].total_steps(spec.model)
    eta = None
    if progress.seconds_per_step:
        left = max(total - progress.step, 0) * progress.seconds_per_step
        eta = (now + timedelta(seconds=left)).astimezone(UTC)
    update = {"step": progress.step, "tokens": progress.tokens, "loss": progress.loss, "eta": eta}
    return status.model_copy(update=update)
