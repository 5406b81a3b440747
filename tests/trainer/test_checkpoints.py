"""Checkpoints under real DeepSpeed on CPU: exact resume, resharding across world sizes,
preemption, corruption and half-written saves, retention and stage hand-over."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pretrain_trainer.ckpt import read_manifest, verify
from pretrain_trainer.contract import ExitCode
from pretrain_trainer.data import build_stdlib_corpus

from tests.trainer.harness import (
    Run,
    preempt_after,
    run_config,
    run_trainer,
    stage,
    start_trainer,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus"))


def _config(corpus: dict[str, Path], steps: int, **fields: Any) -> dict[str, Any]:
    config = run_config(corpus, stages=[stage(budget={"steps": steps}, **fields)])
    config["model"].update(hidden=128, heads=4, seqLen=128)  # slow enough to stop mid-run
    config["stages"][0]["lrSchedule"] = {"warmupSteps": 3, "decay": "cosine"}
    config["checkpoint"] = {"intervalSteps": 5, "keep": 3, "preemptionMinAgeSeconds": 0}
    return config


def _manifest(workdir: Path, step: int) -> dict[str, Any]:
    path = workdir / "checkpoints" / "test" / "stage-0" / f"step-{step}" / "manifest.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _by_step(*runs: Run) -> dict[int, float]:
    """Loss per step; a later run's record of a step replaces an earlier (lost) one."""
    losses: dict[int, float] = {}
    for run in runs:
        losses.update({s["step"]: s["loss"] for s in run.steps})
    return losses


def test_sigterm_saves_and_exits_with_the_retryable_code(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    run = preempt_after(start_trainer(tmp_path, _config(corpus, 400), torchrun=False), step=7)
    assert run.returncode == ExitCode.RETRYABLE, run.stderr
    last = run.steps[-1]["step"]
    assert f"preempted: saved step {last}" in run.stderr
    assert _manifest(tmp_path, last)["step"] == last
    latest = (tmp_path / "checkpoints" / "test" / "latest").read_text().strip()
    assert latest == f"stage-0/step-{last}"


def test_a_stop_during_a_stages_last_step_finishes_the_stage_with_its_final_checkpoint(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    # SIGTERM lands while step 8 of 8 runs: a preemption save there would be a stage's last
    # checkpoint that is not final, and the next stage could never start from it.
    run = preempt_after(start_trainer(tmp_path, _config(corpus, 8), torchrun=False), step=7)
    last = run.steps[-1]["step"]
    if run.returncode == ExitCode.RETRYABLE:  # the stop was seen at step 7: a plain preemption
        assert last == 7, run.stderr
        assert not _manifest(tmp_path, 7)["final"]
        run = run_trainer(tmp_path, _config(corpus, 8), torchrun=False)
    assert run.returncode == ExitCode.STAGE_COMPLETE, run.stderr
    assert run.report is not None
    assert run.report["checkpoint"].endswith("stage-0/step-8")
    assert _manifest(tmp_path, 8)["final"] is True
    assert (tmp_path / "checkpoints" / "test" / "stage-0" / "step-8" / "weights").is_dir()


def test_resume_at_the_same_world_size_is_bitwise_identical(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(corpus, 30, zeroStage=1)
    straight = run_trainer(tmp_path / "straight", config, nproc=2)
    assert straight.returncode == 0, straight.stderr
    first = preempt_after(start_trainer(tmp_path / "cut", config, nproc=2), step=12)
    stopped_at = first.steps[-1]["step"]
    assert stopped_at < 30
    second = run_trainer(tmp_path / "cut", config, nproc=2)
    assert second.returncode == 0, second.stderr
    assert second.steps[0]["step"] == stopped_at + 1  # nothing repeated, nothing skipped
    resumed = _by_step(first, second)
    assert [resumed[s] for s in range(1, 31)] == straight.losses  # exact, not approximate
    # The data position is the same too: the final sampler states agree.
    assert (
        _manifest(tmp_path / "cut", 30)["sampler"]
        == _manifest(tmp_path / "straight", 30)["sampler"]
    )


@pytest.mark.parametrize("zero", [1, 3])
def test_resume_two_three_two_processes_matches_an_uninterrupted_run(
    corpus: dict[str, Path], tmp_path: Path, zero: int
) -> None:
    """2 -> 3 -> 2 processes: on 3, 16 sequences in micro-batches of 2 split 3/3/2 (ZeRO 3 pads
    the short rank). The sampler state is global, so the stream and the steps are the same."""
    config = _config(corpus, 30, zeroStage=zero, globalBatchSize=16)
    straight = run_trainer(tmp_path / "straight", config, nproc=2)
    assert straight.returncode == 0, straight.stderr
    work = tmp_path / "elastic"
    a = preempt_after(start_trainer(work, config, nproc=2), step=8)
    b = preempt_after(start_trainer(work, config, nproc=3), step=a.steps[-1]["step"] + 8)
    assert "converted to the universal format" in b.stderr
    c = run_trainer(work, config, nproc=2)
    assert c.returncode == 0, c.stderr
    assert "converted to the universal format" in c.stderr
    assert {s["worldSize"] for s in b.steps} == {3}
    assert {(s["microBatchesMost"], s["microBatchesFewest"]) for s in b.steps} == {(3, 2)}
    resumed = _by_step(a, b, c)
    assert sorted(resumed) == list(range(1, 31))
    worst = max(abs(resumed[s] - loss) for s, loss in enumerate(straight.losses, start=1))
    assert worst <= 1e-5
    assert _manifest(work, 30)["sampler"] == _manifest(tmp_path / "straight", 30)["sampler"]


def test_a_half_written_newest_checkpoint_is_ignored_and_removed(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(corpus, 10)
    assert run_trainer(tmp_path, config, torchrun=False).returncode == 0
    stage_dir = tmp_path / "checkpoints" / "test" / "stage-0"
    # What a SIGKILL during a save leaves: files, no manifest.
    shutil.copytree(stage_dir / "step-10", stage_dir / "step-15")
    (stage_dir / "step-15" / "manifest.json").unlink()
    config["stages"][0]["budget"] = {"steps": 20}
    resumed = run_trainer(tmp_path, config, torchrun=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "removed incomplete checkpoint" in resumed.stderr
    assert resumed.steps[0]["step"] == 11
    assert _manifest(tmp_path, 15)["step"] == 15  # re-saved properly this time


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(
    corpus: dict[str, Path], tmp_path: Path, damage: str
) -> None:
    config = _config(corpus, 10)
    assert run_trainer(tmp_path, config, torchrun=False).returncode == 0
    newest = tmp_path / "checkpoints" / "test" / "stage-0" / "step-10"
    victim = max(newest.glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    config["stages"][0]["budget"] = {"steps": 12}
    resumed = run_trainer(tmp_path, config, torchrun=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping" in resumed.stderr
    assert victim.name in resumed.stderr
    assert resumed.steps[0]["step"] == 6  # from step-5, the previous valid checkpoint


def test_sigkill_during_frequent_saves_always_leaves_a_valid_checkpoint(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(corpus, 400)
    config["checkpoint"]["intervalSteps"] = 1  # a save in flight almost all the time
    for kill_at in (3, 9, 14):
        started = start_trainer(tmp_path, config, nproc=2)
        deadline = time.monotonic() + 240
        while started.step_count() < kill_at and time.monotonic() < deadline:
            time.sleep(0.01)
        started.signal(signal.SIGKILL)
        started.wait()
    config["stages"][0]["budget"] = {"steps": 20}
    final = run_trainer(tmp_path, config, nproc=2)
    assert final.returncode == 0, final.stderr
    assert final.steps[0]["step"] > 1  # it resumed from a checkpoint, not from scratch
    assert final.report is not None
    assert final.report["step"] == 20


def test_retention_keeps_the_last_checkpoints_and_every_stage_final(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    stages = [stage(budget={"steps": 12}), stage(name="enhancement", budget={"steps": 12})]
    config = run_config(corpus, stages=stages)
    config["checkpoint"] = {"intervalSteps": 2, "keep": 2}
    for index in (0, 1):
        assert run_trainer(tmp_path, config, torchrun=False, stage_index=index).returncode == 0
    root = tmp_path / "checkpoints" / "test"
    kept = sorted(str(p.relative_to(root)) for p in root.glob("stage-*/step-*"))
    assert kept == ["stage-0/step-12", "stage-1/step-10", "stage-1/step-12"]


def test_next_stage_starts_from_final_weights_at_another_world_size_and_zero_stage(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    stages = [
        stage(budget={"steps": 30}, zeroStage=1),
        stage(
            name="enhancement",
            budget={"steps": 5},
            zeroStage=3,
            optimizer={"lr": 1e-3},
            lrSchedule={"warmupSteps": 4},
        ),
    ]
    config = run_config(corpus, stages=stages)
    first = run_trainer(tmp_path, config, nproc=2, stage_index=0)
    assert first.returncode == 0, first.stderr
    second = run_trainer(tmp_path, config, nproc=1, stage_index=1)
    assert second.returncode == 0, second.stderr
    assert "starts from the final weights of" in second.stderr
    assert second.steps[0]["loss"] < first.steps[0]["loss"] - 0.5  # trained, not fresh
    # A fresh optimizer and schedule: the new stage's first step runs at its own warmup lr.
    assert second.steps[0]["lr"] == pytest.approx(1e-3 / 4)


def test_an_unwritable_checkpoint_path_fails_before_training_naming_the_path(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {"PRETRAIN_CHECKPOINT_ROOT": str(blocker / "checkpoints")}
    run = run_trainer(tmp_path / "run", _config(corpus, 10), env=env, torchrun=False)
    assert run.returncode == ExitCode.PERMANENT, run.stderr
    assert run.steps == []
    assert run.report is not None
    assert run.report["exitCode"] == ExitCode.PERMANENT
    assert (
        f"checkpoint path {blocker / 'checkpoints' / 'test'} is not writable"
        in (run.report["error"])
    )


def test_a_full_disk_fails_the_save_clearly_and_keeps_the_earlier_checkpoints(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(corpus, 400)
    first = preempt_after(start_trainer(tmp_path, config, torchrun=False), step=7)
    kept = first.steps[-1]["step"]
    assert _manifest(tmp_path, kept)["step"] == kept
    # Every file the trainer writes from now on is capped below a checkpoint's size.
    full = start_trainer(tmp_path, config, torchrun=False, file_size_limit=512 << 10).wait()
    assert full.returncode == ExitCode.PERMANENT, full.stderr
    failed_at = full.steps[-1]["step"]
    assert failed_at > kept
    assert full.report is not None
    error = full.report["error"]
    assert f"cannot write checkpoint {tmp_path / 'checkpoints' / 'test' / 'stage-0'}" in error
    assert "File too large (EFBIG)" in error
    assert "the checkpoints before it are intact" in error
    root = tmp_path / "checkpoints" / "test"
    assert (root / "latest").read_text().strip() == f"stage-0/step-{kept}"
    written = [int(p.name.removeprefix("step-")) for p in (root / "stage-0").glob("step-*")]
    assert kept in written
    assert max(written) == kept, written  # the partial checkpoint was removed
    directory = root / "stage-0" / f"step-{kept}"
    assert verify(directory, read_manifest(directory)).ok
