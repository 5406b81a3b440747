"""The end of a stage: its record in the history, then the next stage or Succeeded.

A stage is finished when every worker of the attempt exited 0 and at least one reported it
(the trainer's stage report). The report's step, tokens, loss and final checkpoint go into
``status.stages``; the next stage starts as a new attempt whose workers load that checkpoint,
at the world size the next stage's global batch allows. A finished stage is progress, so the
failure streak (and with it the restart back-off) starts over. After the last stage, a job
with ``spec.export`` exports its final checkpoint first (``exporting``).
"""

from __future__ import annotations

from collections.abc import Mapping

from pretrain_trainer.contract import StageReport

from ..api import JobStatus, Phase, Reason, StageRecord, WorkersStatus
from .context import Pass
from .elastic import start
from .exporting import begin
from .model import Event, Plan, Worker, WorkerState
from .phase import set_phase


def finished(current: list[Worker]) -> StageReport | None:
    """The stage report, if every worker of the current attempt finished the stage."""
    done = [w.report for w in current if w.state == WorkerState.SUCCEEDED and w.report is not None]
    if done and all(w.state == WorkerState.SUCCEEDED for w in current):
        return done[0]
    return None


def _finite(losses: Mapping[str, float | None] | None) -> dict[str, float] | None:
    """The held-out losses that are numbers (a diverged one is reported as none)."""
    if not losses:
        return None
    return {source: loss for source, loss in losses.items() if loss is not None}


def complete(ctx: Pass, status: JobStatus, report: StageReport) -> Plan:
    """Record the pass's stage as finished, then start the next one or succeed the job."""
    started = status.stage.started_at if status.stage is not None else None
    record = StageRecord(
        index=ctx.stage,
        name=ctx.stage_name,
        started_at=started,
        finished_at=ctx.now,
        step=report.step,
        tokens=report.tokens,
        loss=report.loss,
        eval_loss=_finite(report.eval_loss),
        checkpoint=report.checkpoint,
    )
    status = status.model_copy(
        update={
            "stages": [r for r in status.stages if r.index != ctx.stage] + [record],
            "step": report.step,
            "tokens": report.tokens,
            "loss": report.loss,
            "failures_in_a_row": 0,
        }
    )
    message = f"stage {ctx.stage_name} finished at step {report.step}"
    if ctx.stage + 1 < len(ctx.spec.stages):
        after = ctx.next_stage()
        message += f"; starting {after.stage_name}"
        return start(after, status, reason=Reason.STAGE_COMPLETED, message=message)
    said = (Event(Reason.STAGE_COMPLETED, message),)
    if ctx.spec.export is not None:
        return begin(ctx, status, ctx.spec.export, checkpoint=report.checkpoint, said=said)
    status = status.model_copy(update={"workers": WorkersStatus()})
    all_done = "all stages finished"
    status = set_phase(
        status, Phase.SUCCEEDED, reason=Reason.SUCCEEDED, message=all_done, now=ctx.now
    )
    return Plan(group=None, status=status, events=(*said, Event(Reason.SUCCEEDED, all_done)))
