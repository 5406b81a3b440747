"""The export of the trained model (``spec.export``): after the last stage, before Succeeded.

When the last stage's workers report completion, a job with ``spec.export`` stays Running
(reason Exporting) and asks its backend for one export: the trainer's ``export`` command on
the last stage's final checkpoint (a short-lived pod on Kubernetes, a process locally). It
succeeds -> ``status.export.finishedAt`` and Succeeded. It exits 2 (the checkpoint or the
path is wrong: a retry cannot help) -> Failed, ExportFailed. It is lost or fails otherwise
(a node gone, out of memory) -> another try, up to :data:`TRIES`. Each try keeps what an
earlier one completed (``--keep-existing``), so a try that finished unseen is not redone.
"""

from __future__ import annotations

from ..api import ExportSpec, ExportStatus, JobStatus, Phase, Reason, WorkersStatus
from .context import Pass
from .model import Event, ExportTask, Plan, WorkerState
from .phase import set_phase

TRIES = 3
PERMANENT_EXIT = 2  # the export command's: bad input, one line said why
RECHECK_SECONDS = 2.0


def begin(
    ctx: Pass, status: JobStatus, wanted: ExportSpec, *, checkpoint: str, said: tuple[Event, ...]
) -> Plan:
    """The last stage finished at ``checkpoint``: start exporting it as ``wanted`` says."""
    export = ExportStatus(
        checkpoint=checkpoint,
        path=wanted.path,
        format=wanted.format,
        dtype=wanted.dtype,
        started_at=ctx.now,
    )
    status = status.model_copy(update={"workers": WorkersStatus(), "export": export})
    message = f"exporting {checkpoint} to {export.path} ({export.format})"
    status = set_phase(status, Phase.RUNNING, reason=Reason.EXPORTING, message=message, now=ctx.now)
    return _running(ctx, status, export, said=(*said, Event(Reason.EXPORTING, message)))


def proceed(ctx: Pass, status: JobStatus, export: ExportStatus) -> Plan:
    """The export under way (``status.export``): wait for it, try again, or end the job."""
    if status.phase == Phase.SUSPENDED:  # resumed: a fresh try (the last one was stopped)
        export = _next_try(export)
        message = f"resumed: exporting {export.checkpoint} to {export.path}"
        status = _exporting(ctx, status, export, message)
        return _running(ctx, status, export, said=(Event(Reason.RESUMED, message),))
    seen = ctx.observed.export
    waiting = (WorkerState.PENDING, WorkerState.RUNNING, WorkerState.IDLE)
    if seen is None or seen.attempt != export.attempt or seen.state in waiting:
        return _running(ctx, status, export)
    if seen.state == WorkerState.SUCCEEDED:
        export = export.model_copy(update={"finished_at": ctx.now})
        message = f"all stages finished; exported to {export.path}"
        done = set_phase(
            status.model_copy(update={"export": export}),
            Phase.SUCCEEDED,
            reason=Reason.SUCCEEDED,
            message=message,
            now=ctx.now,
        )
        return Plan(group=None, status=done, events=(Event(Reason.SUCCEEDED, message),))
    if seen.message:
        why = seen.message
    elif seen.exit_code is not None:
        why = f"exit code {seen.exit_code}"
    else:
        why = "lost"
    if seen.exit_code == PERMANENT_EXIT or export.attempt >= TRIES:
        message = f"export of {export.checkpoint} failed (try {export.attempt}): {why}"
        failed = set_phase(
            status, Phase.FAILED, reason=Reason.EXPORT_FAILED, message=message, now=ctx.now
        )
        warning = Event(Reason.EXPORT_FAILED, message, warning=True)
        return Plan(group=None, status=failed, events=(warning,))
    message = f"export try {export.attempt} ended ({why}); trying again"
    export = _next_try(export)
    status = _exporting(ctx, status, export, message)
    return _running(ctx, status, export, said=(Event(Reason.EXPORTING, message, warning=True),))


def _next_try(export: ExportStatus) -> ExportStatus:
    return export.model_copy(update={"attempt": export.attempt + 1})


def _exporting(ctx: Pass, status: JobStatus, export: ExportStatus, message: str) -> JobStatus:
    status = status.model_copy(update={"export": export})
    return set_phase(status, Phase.RUNNING, reason=Reason.EXPORTING, message=message, now=ctx.now)


def _running(
    ctx: Pass, status: JobStatus, export: ExportStatus, *, said: tuple[Event, ...] = ()
) -> Plan:
    """The plan that keeps ``export``'s current try running (and no workers)."""
    task = ExportTask(
        checkpoint=export.checkpoint,
        path=export.path,
        format=export.format,
        dtype=export.dtype,
        attempt=export.attempt,
    )
    return Plan(
        group=None,
        status=status,
        events=said,
        stop=ctx.observed.running(),
        export=task,
        requeue_after=RECHECK_SECONDS,
    )
