"""The export on Kubernetes (spec.export): its pod, how it is read, and what a pass does while
it runs, as data."""

from __future__ import annotations

from pretrain_operator.api import JobStatus, Phase, parse_job
from pretrain_operator.kube.actions import actions
from pretrain_operator.kube.objects import export_pod, rendezvous_pod, standby_pod
from pretrain_operator.kube.observe import observe_export
from pretrain_operator.plan import ExportTask, Plan, WorkerState

from tests.conftest import minimal_job
from tests.unit.operator.test_kube_actions import PODS, READY, placed, said, worker

JOB = parse_job(
    minimal_job(
        elastic={"minWorkers": 1, "maxWorkers": 2},
        volumes=[{"name": "ckpt", "claimName": "shared", "mountPath": "/ckpt"}],
        export={"path": "/ckpt/model"},
    )
    | {"metadata": {"name": "demo", "namespace": "ml"}}
)


def task(attempt: int = 1) -> ExportTask:
    return ExportTask("/ckpt/final", "/ckpt/model", "hf", "fp32", attempt)


def test_the_export_pod_runs_the_export_command_on_the_jobs_volumes_without_accelerators() -> None:
    pod = export_pod(JOB, task(2))
    assert pod["metadata"]["name"] == "demo-export-2"
    assert pod["metadata"]["labels"]["pretrain.dev/role"] == "export"
    container = pod["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "pretrain_trainer"]
    assert container["command"][3:] == task(2).arguments()
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert "nvidia.com/gpu" not in str(container.get("resources"))
    assert container["volumeMounts"] == [{"name": "ckpt", "mountPath": "/ckpt", "readOnly": False}]
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared"}


def _export(attempt: int, **kw: object) -> dict:
    return placed(export_pod(JOB, task(attempt)), **kw)  # type: ignore[arg-type]


def test_the_newest_try_is_read_with_its_exit_code_and_last_log_line() -> None:
    failed = _export(2, phase="Failed")
    failed["status"]["containerStatuses"] = [
        {"name": "trainer", "state": {"terminated": {"exitCode": 2, "message": "a\nbad path"}}}
    ]
    seen = observe_export([_export(1, phase="Failed"), failed], READY)
    assert seen is not None
    assert (seen.attempt, seen.state, seen.exit_code, seen.message) == (
        2,
        WorkerState.FAILED,
        2,
        "bad path",
    )
    assert observe_export([_export(1, node="down")], READY).state == WorkerState.LOST  # type: ignore[union-attr]
    assert observe_export([_export(1, phase="Succeeded")], READY).state == WorkerState.SUCCEEDED  # type: ignore[union-attr]
    assert observe_export([placed(rendezvous_pod(JOB))], READY) is None


def test_while_exporting_only_the_current_try_runs_and_ended_tries_stay() -> None:
    pods = [
        placed(rendezvous_pod(JOB)),
        worker(1, 0, phase="Succeeded"),
        placed(standby_pod(JOB, 1)),
        _export(1, phase="Failed"),
    ]
    result = Plan(group=None, status=JobStatus(phase=Phase.RUNNING), export=task(2))
    assert said(actions(JOB, result, pods, nodes=READY, options=PODS)) == [
        ("delete", "Pod", "demo-rdzv", None),
        ("delete", "Pod", "demo-a1-w0", None),
        ("delete", "Pod", "demo-standby-w1", None),
        ("create", "Pod", "demo-export-2"),
    ]
    again = [*pods[3:], _export(2)]
    assert actions(JOB, result, again, nodes=READY, options=PODS) == []
