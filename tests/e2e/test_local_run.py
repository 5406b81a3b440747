"""End to end on this machine: `pretrainctl run` trains the three-stage tiny job with real
worker processes while workers are killed and come back; it still succeeds, and ends where an
undisturbed run ends."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from pretrain_operator.api import JobStatus, MicroBatchesStatus, Phase, PretrainJob
from pretrain_operator.cli import main
from pretrain_operator.local.backend import read_capacity, write_capacity
from pretrain_operator.local.display import results_table
from pretrain_operator.local.processes import descendants
from pretrain_operator.local.runner import Update, run
from pretrain_operator.manifests import load_job
from pretrain_operator.telemetry.goodput import goodput
from pretrain_operator.telemetry.recovery import PHASES, TOTAL
from pretrain_trainer.data import build_stdlib_corpus
from pretrain_trainer.train import build_model
from rich.console import Console

from tests.conftest import ROOT
from tests.support.hf import assert_same_model

pytestmark = pytest.mark.slow
TINY = ROOT / "examples" / "tiny-cpu.yaml"


def _last_step(run_dir: Path) -> tuple[int, int]:
    try:
        lines = (run_dir / "steps.jsonl").read_text().splitlines()
        record = json.loads(lines[-1])
        return int(record["stage"]), int(record["step"])
    except (OSError, ValueError, IndexError):
        return -1, 0


def _slot_processes(run_dir: Path, slot: int) -> list[int]:
    """The worker agent of a slot (its command line names the slot's folder) and everything
    under it: its fork server and trainers."""
    marker = f"--dir={run_dir.resolve()}/workers/{slot}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().split(b"\0"):
                return [int(proc.name), *descendants(int(proc.name))]
        except OSError:
            continue
    return []


def _saving(run_dir: Path, after: tuple[int, int]) -> Path | None:
    """A checkpoint past ``after`` being written (its directory exists, its manifest not)."""
    root = run_dir / "checkpoints" / "tiny-cpu"
    for directory in root.glob("stage-*/step-*"):
        at = (int(directory.parent.name[6:]), int(directory.name[5:]))
        if at > after and not (directory / "manifest.json").exists():
            return directory
    return None


def _chaos(
    run_dir: Path,
    script: list[tuple[tuple[int, int], str]],
    stop: threading.Event,
    cut: list[Path],
) -> None:
    """At each (stage, step) reached, take a worker slot away or give one back. "kill-in-save"
    waits for the next checkpoint to start and SIGKILLs slot 0's processes while it is written
    (a node lost mid-save), appending the half-written checkpoint to ``cut``."""
    for (stage, step), action in script:
        while not stop.is_set() and _last_step(run_dir) < (stage, step):
            time.sleep(0.05)
        if action == "kill-in-save":
            while not stop.is_set() and (directory := _saving(run_dir, (stage, step))) is None:
                time.sleep(0.001)
            for pid in _slot_processes(run_dir, 0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if directory is not None and not (directory / "manifest.json").exists():
                cut.append(directory)
        if stop.is_set():
            return
        if action == "pause":  # let the planner see the loss before capacity comes back
            time.sleep(5)
            continue
        capacity, down = read_capacity(run_dir)
        if action.startswith("kill"):
            down.add(0)  # slot 0: the worker that usually hosts rank 0
        else:
            down.discard(0)
        write_capacity(run_dir, capacity, down)


def _run_with_chaos(
    job: PretrainJob, run_dir: Path, script: list[tuple[tuple[int, int], str]], cut: list[Path]
) -> JobStatus:
    """Run the job on 2 workers while ``_chaos`` plays ``script`` against it."""
    stop = threading.Event()
    chaos = threading.Thread(target=_chaos, args=(run_dir, script, stop, cut))
    chaos.start()
    try:
        return run(job, run_dir, workers=2)
    finally:
        stop.set()
        chaos.join()


def _prepared(tmp_path: Path, name: str) -> Path:
    run_dir = tmp_path / name
    build_stdlib_corpus(run_dir / "data")
    return run_dir


def test_workers_killed_and_returning_do_not_change_the_outcome(tmp_path: Path) -> None:
    job = load_job(TINY)
    calm_dir = _prepared(tmp_path, "calm")
    calm = run(job, calm_dir, workers=2)
    assert calm.phase == Phase.SUCCEEDED
    assert_held_out_loss_falls_stage_by_stage(job, calm, calm_dir)
    assert_the_final_checkpoint_was_exported(job, calm, calm_dir)

    stormy_dir = _prepared(tmp_path, "stormy")
    script: list[tuple[tuple[int, int], str]] = [
        ((0, 30), "kill-in-save"),  # mid-stage, during the save of step 40: continue at world
        ((0, 70), "add"),  # size 1 from the newest complete checkpoint; capacity back: grow to 2
        ((1, 3), "kill"),  # right after a stage transition
        ((1, 20), "add"),
    ]
    cut: list[Path] = []
    stormy = _run_with_chaos(job, stormy_dir, script, cut)
    assert cut, "the kill did not land during a save"
    assert not cut[0].exists()  # the half-written checkpoint was removed, never restored
    logs = "".join(log.read_text() for log in stormy_dir.glob("workers/*/attempt-*.log"))
    restored = re.findall(r"restored everything from (\S+) \(\w+\):", logs)
    assert restored  # the survivors resumed from a checkpoint...
    assert str(cut[0]) not in restored  # ...never from the half-written one
    assert stormy.phase == Phase.SUCCEEDED, stormy.conditions
    assert stormy.restarts.by_reason.get("WorkerLost", 0) >= 1
    assert [s.name for s in stormy.stages] == ["foundation", "enhancement", "instruction"]
    for record in stormy.stages:
        assert record.checkpoint is not None
        assert (Path(record.checkpoint) / "manifest.json").is_file()
    final, expected = stormy.stages[-1].loss, calm.stages[-1].loss
    assert final is not None
    assert expected is not None
    assert abs(final - expected) <= 0.02 * expected
    assert_recoveries_and_goodput(stormy, lost=stormy.restarts.by_reason["WorkerLost"])


def assert_held_out_loss_falls_stage_by_stage(
    job: PretrainJob, status: JobStatus, run_dir: Path
) -> None:
    """Every stage reports its held-out loss on both eval sources in the status and the run's
    table; the mean over them falls from stage to stage; the step log has the evaluations of
    foundation's interval (50) and of every stage's end."""
    held_out = [record.eval_loss for record in status.stages]
    assert all(losses is not None and set(losses) == {"code", "prose"} for losses in held_out)
    means = [sum(losses.values()) / len(losses) for losses in held_out if losses]
    assert means == sorted(means, reverse=True), held_out
    assert means[0] < math.log(256)  # far below chance over bytes
    evaluated = [
        (r["stage"], r["step"])
        for r in map(json.loads, (run_dir / "steps.jsonl").read_text().splitlines())
        if r.get("evalLoss")
    ]
    assert sorted(set(evaluated)) == [(0, 50), (0, 100), (1, 60), (2, 40)]
    console = Console(record=True, width=200)
    console.print(results_table(job, status))
    table = console.export_text()
    assert "eval code" in table
    assert "eval prose" in table
    first = held_out[0]
    assert first is not None
    assert f"{first['code']:.4f} (ppl {math.exp(first['code']):.2f})" in table


def assert_the_final_checkpoint_was_exported(
    job: PretrainJob, status: JobStatus, run_dir: Path
) -> None:
    """spec.export: before Succeeded, the last stage's final checkpoint became a Hugging Face
    model in the run directory that transformers loads and that computes what ours does."""
    pytest.importorskip("transformers")
    export = status.export
    assert export is not None
    assert export.finished_at is not None
    assert export.checkpoint == status.stages[-1].checkpoint
    out = run_dir / export.path
    provenance = json.loads((out / "export.json").read_text())
    assert (provenance["checkpoint"], provenance["format"]) == ("stage-2/step-40", "hf")
    ours = build_model(job.spec.run_config(), job.spec.stages[-1])
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted((Path(export.checkpoint) / "weights").glob("rank-*.pt")):
        weights.update(torch.load(shard, weights_only=True))
    ours.load_state_dict(weights, strict=False)
    assert_same_model(ours, out)


def assert_recoveries_and_goodput(status: JobStatus, *, lost: int) -> None:
    """Every loss was followed by a recovery in eight phases that add up to its total, and
    goodput charged the lost work and the restore."""
    history, last = status.recoveries, status.last_recovery
    assert history.count == lost
    assert last is not None
    phases = last.phases.model_dump()
    assert set(phases) == set(PHASES)
    assert sum(phases.values()) == pytest.approx(last.total_seconds, abs=0.1)
    assert sum(history.sums[p] for p in PHASES) == pytest.approx(history.sums[TOTAL], abs=0.1)
    assert phases["restore"] > 0
    assert phases["rendezvous"] > 0
    figures = goodput(status, now=time.time())
    assert figures is not None
    assert 0 < figures.ratio < 1
    assert figures.badput["restart"] > 0
    assert figures.badput["restore"] > 0
    assert figures.productive + sum(figures.badput.values()) == pytest.approx(figures.wall)


def test_workers_lost_under_parallel_layouts_change_only_the_data_parallel_degree(
    tmp_path: Path,
) -> None:
    """examples/tiny-moe-cpu.yaml: 2 workers of 2 processes, a stage of two pipelines with
    experts spread over both, then a tensor-2 stage. A worker lost in the first waits for its
    return (the expert groups span both workers); one lost in the second leaves one tensor
    group, which resumes through the universal format and grows back. The run ends where an
    undisturbed one ends."""
    job = load_job(ROOT / "examples" / "tiny-moe-cpu.yaml")
    calm = run(job, _prepared(tmp_path, "calm"), workers=2)
    assert calm.phase == Phase.SUCCEEDED, calm.conditions
    stormy_dir = _prepared(tmp_path, "stormy")
    script: list[tuple[tuple[int, int], str]] = [
        ((0, 25), "kill"),
        ((0, 25), "pause"),
        ((0, 25), "add"),
        ((1, 5), "kill"),
        ((1, 15), "add"),
    ]
    stormy = _run_with_chaos(job, stormy_dir, script, [])
    assert stormy.phase == Phase.SUCCEEDED, stormy.conditions
    assert stormy.restarts.by_reason.get("WorkerLost", 0) >= 2
    records = [json.loads(line) for line in (stormy_dir / "steps.jsonl").read_text().splitlines()]
    assert {(r["stage"], r["worldSize"]) for r in records} == {(0, 4), (1, 2), (1, 4)}
    for mine, undisturbed in zip(stormy.stages, calm.stages, strict=True):
        assert mine.loss is not None
        assert undisturbed.loss is not None
        assert abs(mine.loss - undisturbed.loss) <= 1e-4


def test_three_workers_train_a_batch_only_one_and_five_divide(tmp_path: Path) -> None:
    """5 sequences a step over 3 worker slots: the ranks run 2, 2 and 1 micro-batches (83%
    efficient, 2.5 workers' worth) instead of falling back to 1 worker, the largest divisor."""
    body = yaml.safe_load(TINY.read_text())
    body["spec"]["elastic"]["maxWorkers"] = 3
    body["spec"]["stages"] = [
        {**body["spec"]["stages"][0], "budget": {"steps": 6}, "globalBatchSize": 5}
        | {"microBatchSize": 1}
    ]
    manifest = tmp_path / "uneven.yaml"
    manifest.write_text(yaml.safe_dump(body))
    run_dir = _prepared(tmp_path, "run")
    seen: list[tuple[int, MicroBatchesStatus]] = []

    def watch(update: Update) -> None:
        workers = update.status.workers
        if workers.micro_batches is not None:
            seen.append((workers.desired, workers.micro_batches))

    result = run(load_job(manifest), run_dir, workers=3, on_update=watch)
    assert result.phase == Phase.SUCCEEDED, result.conditions
    assert {desired for desired, _ in seen} == {3}
    assert {(m.most, m.fewest, m.efficiency) for _, m in seen} == {(2, 1, 0.8333)}
    records = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert {(r["worldSize"], r["microBatchesMost"], r["microBatchesFewest"]) for r in records} == {
        (3, 2, 1)
    }
    assert all(r["tokens"] == r["step"] * 5 * 128 for r in records)


def test_a_directory_of_another_job_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.json").write_text(json.dumps({"job": "other", "stages": ["x"]}))
    assert main(["run", str(TINY), "--dir", str(run_dir)]) == 2
    assert "holds job 'other'" in capsys.readouterr().err


def test_an_invalid_job_file_exits_2_with_field_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "job.yaml"
    broken.write_text(TINY.read_text().replace("globalBatchSize: 16", "globalBatchSize: -16"))
    assert main(["run", str(broken), "--dir", str(tmp_path / "run")]) == 2
    assert "spec.stages[0].globalBatchSize" in capsys.readouterr().err


def test_workers_command_takes_slots_away_and_gives_them_back(tmp_path: Path) -> None:
    write_capacity(tmp_path, 2, set())
    assert main(["workers", "kill", "--dir", str(tmp_path)]) == 0
    assert read_capacity(tmp_path) == (2, {1})
    assert main(["workers", "add", "--dir", str(tmp_path)]) == 0
    assert read_capacity(tmp_path) == (2, set())
    assert main(["workers", "add", "--dir", str(tmp_path)]) == 0
    assert read_capacity(tmp_path) == (3, set())


def test_backend_reads_the_trainers_outcome_from_its_report(tmp_path: Path) -> None:
    from pretrain_operator.plan import WorkerState, exited
    from pretrain_trainer.contract import StageReport, read_report

    report = tmp_path / "report.json"

    def outcome(code: int) -> tuple[WorkerState, int | None, str | None, object]:
        worker = exited(
            slot=0,
            attempt=1,
            stage=1,
            succeeded=code == 0,
            exit_code=code,
            report=read_report(report),
        )
        return worker.state, worker.exit_code, worker.reason, worker.report

    assert outcome(1) == (WorkerState.FAILED, 1, None, None)  # no report: torchrun's code
    report.write_text(json.dumps({"finished": False, "exitCode": 78, "error": "bad shard"}))
    assert outcome(1) == (WorkerState.FAILED, 78, "bad shard", None)
    report.write_text(
        json.dumps(
            {"finished": True, "stage": 1, "step": 40, "tokens": 9, "loss": 2.5, "checkpoint": "/c"}
        )
    )
    state, code, _, stage_report = outcome(0)
    assert (state, code) == (WorkerState.SUCCEEDED, 0)
    assert isinstance(stage_report, StageReport)
    assert (stage_report.stage, stage_report.step, stage_report.loss) == (1, 40, 2.5)


def _stage_steps(run_dir: Path) -> list[tuple[int, int]]:
    lines = (run_dir / "steps.jsonl").read_text().splitlines()
    return [(int(r["stage"]), int(r["step"])) for r in map(json.loads, lines)]


def test_an_unwritable_checkpoint_path_fails_the_job_naming_it_and_a_rerun_retries(
    tmp_path: Path,
) -> None:
    job = load_job(TINY)
    run_dir = _prepared(tmp_path, "run")
    blocker = run_dir / "checkpoints" / job.name
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the job's checkpoint directory belongs")
    failed = run(job, run_dir, workers=1)
    assert failed.phase == Phase.FAILED
    why = next(c for c in failed.conditions if c.type == "Failed")
    assert why.reason == "PermanentError"
    assert f"checkpoint path {blocker} is not writable" in why.message
    assert failed.restarts.total == 0  # retrying could not have helped

    blocker.unlink()  # the cause fixed: the same command goes on

    def interrupt_once_training(update: Update) -> None:
        if (run_dir / "steps.jsonl").exists() and _stage_steps(run_dir):
            raise KeyboardInterrupt

    retried = run(job, run_dir, workers=1, on_update=interrupt_once_training)
    assert retried.phase == Phase.SUSPENDED
    assert retried.attempt > failed.attempt
    assert _stage_steps(run_dir)[0] == (0, 1)  # it trained this time


def test_ctrl_c_suspends_with_a_checkpoint_and_a_second_run_resumes(tmp_path: Path) -> None:
    run_dir = _prepared(tmp_path, "run")
    command = [
        sys.executable,
        "-m",
        "pretrain_operator.cli",
        "run",
        str(TINY),
        "--dir",
        str(run_dir),
        "--workers",
        "2",
    ]
    with (tmp_path / "pretrainctl.log").open("wb") as log:
        cli = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            while not (run_dir / "steps.jsonl").exists() or _stage_steps(run_dir)[-1] < (0, 20):
                assert cli.poll() is None, (tmp_path / "pretrainctl.log").read_text()
                time.sleep(0.1)
            cli.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
            assert cli.wait(timeout=120) == 130
        finally:
            if cli.poll() is None:
                cli.kill()
    output = (tmp_path / "pretrainctl.log").read_text()
    assert "suspended; `pretrainctl run" in output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["phase"] == "Suspended"
    assert _no_process_left(run_dir)
    interrupted = _stage_steps(run_dir)[-1]
    latest = (run_dir / "checkpoints" / "tiny-cpu" / "latest").read_text().strip()
    stage, step = (int(part.split("-")[1]) for part in latest.split("/"))
    assert (0, 20) <= (stage, step) <= interrupted  # the checkpoints survive a suspend
    spec = load_job(TINY).spec
    finished = step == spec.stages[stage].total_steps(spec.model)  # Ctrl-C came at a stage end
    expected = (stage + 1, 1) if finished else (stage, step + 1)

    resumed = run(load_job(TINY), run_dir)
    assert resumed.phase == Phase.SUCCEEDED
    steps = _stage_steps(run_dir)
    after = steps[steps.index(interrupted) + 1]  # the first step of the resumed run
    assert after == expected  # went on from the newest checkpoint, not from the start


def _no_process_left(run_dir: Path) -> bool:
    """No process (a torchrun agent, a trainer) still runs inside the run directory."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cwd").resolve() == run_dir.resolve():
                return False
        except OSError:
            continue
    return True
