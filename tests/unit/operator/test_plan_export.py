"""spec.export in the planning core, scenario by scenario: the last stage hands over to one
export try; it succeeds the job, fails it on a permanent error, or is tried again when lost."""

from __future__ import annotations

from datetime import timedelta

from pretrain_operator.api import ExportSpec, JobStatus, Phase, PretrainJobSpec, Reason
from pretrain_operator.plan import ExportRun, Observed, Plan, WorkerState, plan

from tests.unit.operator.test_plan import NOW, REPORT, _finished, _idle, _spec, make_status

S = WorkerState
LATER = NOW + timedelta(seconds=30)


def _exporting_spec() -> PretrainJobSpec:
    return _spec().model_copy(update={"export": ExportSpec(path="/out/model", dtype="bf16")})


def _last_stage_done(spec: PretrainJobSpec) -> Plan:
    status = make_status(spec).at_stage(1).running(attempt=2, slots=(0,)).obj()
    return plan(spec=spec, status=status, observed=Observed(_finished(2, 0, stage=1)), now=NOW)


def _seen(spec: PretrainJobSpec, status: JobStatus, run: ExportRun | None) -> Plan:
    return plan(spec=spec, status=status, observed=Observed(_idle(0), export=run), now=LATER)


def test_the_last_stage_finishing_starts_the_export_of_its_final_checkpoint() -> None:
    result = _last_stage_done(_exporting_spec())
    assert result.group is None
    assert result.status.phase == Phase.RUNNING
    assert result.status.conditions[-1].reason == Reason.EXPORTING
    assert result.export is not None
    assert result.export.arguments() == [
        "export",
        REPORT.checkpoint,
        "--out",
        "/out/model",
        "--format",
        "hf",
        "--dtype",
        "bf16",
        "--keep-existing",
    ]
    export = result.status.export
    assert export is not None
    assert (export.checkpoint, export.attempt, export.finished_at) == (REPORT.checkpoint, 1, None)
    assert [e.reason for e in result.events] == [Reason.STAGE_COMPLETED, Reason.EXPORTING]
    assert [r.name for r in result.status.stages] == ["foundation", "instruction"]


def test_while_it_runs_the_export_is_asked_for_again_and_no_group_starts() -> None:
    spec = _exporting_spec()
    started = _last_stage_done(spec).status
    for run in (None, ExportRun(attempt=1, state=S.PENDING), ExportRun(attempt=1, state=S.RUNNING)):
        again = _seen(spec, started, run)
        assert (again.group, again.status.phase) == (None, Phase.RUNNING)
        assert again.export is not None
        assert again.export.attempt == 1


def test_a_finished_export_succeeds_the_job_and_says_where() -> None:
    spec = _exporting_spec()
    started = _last_stage_done(spec).status
    done = _seen(spec, started, ExportRun(attempt=1, state=S.SUCCEEDED, exit_code=0))
    assert done.status.phase == Phase.SUCCEEDED
    assert done.export is None
    assert done.status.export is not None
    assert done.status.export.finished_at == LATER
    assert done.status.conditions[-1].message == "all stages finished; exported to /out/model"
    assert _seen(spec, done.status, None).status.phase == Phase.SUCCEEDED  # and stays so


def test_an_export_that_exits_2_fails_the_job_with_its_line() -> None:
    spec = _exporting_spec()
    started = _last_stage_done(spec).status
    line = "error: /out/model already exists; give a new directory to export into"
    run = ExportRun(attempt=1, state=S.FAILED, exit_code=2, message=line)
    failed = _seen(spec, started, run)
    assert failed.status.phase == Phase.FAILED
    assert failed.status.conditions[-1].reason == Reason.EXPORT_FAILED
    assert failed.status.conditions[-1].message.endswith(line)
    assert failed.export is None


def test_a_lost_export_is_tried_again_up_to_three_times() -> None:
    spec = _exporting_spec()
    status = _last_stage_done(spec).status
    for attempt in (1, 2):
        result = _seen(spec, status, ExportRun(attempt=attempt, state=S.LOST))
        assert result.status.phase == Phase.RUNNING
        assert result.export is not None
        assert result.export.attempt == attempt + 1
        assert result.events[0].warning
        status = result.status
    out_of_tries = _seen(spec, status, ExportRun(attempt=3, state=S.FAILED, exit_code=137))
    assert out_of_tries.status.phase == Phase.FAILED
    assert "failed (try 3): exit code 137" in out_of_tries.status.conditions[-1].message


def test_an_older_tries_end_is_not_this_ones() -> None:
    spec = _exporting_spec()
    status = _seen(spec, _last_stage_done(spec).status, ExportRun(attempt=1, state=S.LOST)).status
    stale = _seen(spec, status, ExportRun(attempt=1, state=S.FAILED, exit_code=2))
    assert stale.status.phase == Phase.RUNNING
    assert stale.export is not None
    assert stale.export.attempt == 2


def test_suspend_stops_the_export_and_resume_tries_it_afresh() -> None:
    spec = _exporting_spec()
    started = _last_stage_done(spec).status
    suspending = spec.model_copy(update={"suspend": True})
    suspended = _seen(suspending, started, ExportRun(attempt=1, state=S.RUNNING))
    assert (suspended.status.phase, suspended.export) == (Phase.SUSPENDED, None)
    resumed = _seen(spec, suspended.status, ExportRun(attempt=1, state=S.LOST))
    assert resumed.status.phase == Phase.RUNNING
    assert resumed.export is not None
    assert resumed.export.attempt == 2
    assert resumed.events[0].reason == Reason.RESUMED


def test_without_spec_export_the_last_stage_succeeds_the_job_at_once() -> None:
    result = _last_stage_done(_spec())
    assert (result.status.phase, result.export, result.status.export) == (
        Phase.SUCCEEDED,
        None,
        None,
    )
