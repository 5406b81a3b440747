"""The trainer really trains: DeepSpeed ZeRO on CPU with torchrun, a real corpus, MoE,
metrics over HTTP, and clean permanent errors for bad input."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pretrain_trainer.contract import ExitCode
from pretrain_trainer.data import build_stdlib_corpus

from tests.trainer.harness import (
    Run,
    reference_losses,
    reference_run,
    run_config,
    run_trainer,
    stage,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus"))


def assert_matches_plain_pytorch(run: Run, config: dict[str, Any], *, steps: int) -> None:
    """Losses to 1e-5 and gradient norms to 1e-4 of the single-process reference: the stability
    guard sees the true global norm before clipping, not a rank's partition."""
    expected, norms = reference_run(config, steps=steps)
    assert len(run.losses) == steps
    assert max(abs(a - b) for a, b in zip(run.losses, expected, strict=True)) <= 1e-5
    seen = [s["gradNorm"] for s in run.steps]
    assert max(abs(a - b) / b for a, b in zip(seen, norms, strict=True)) <= 1e-4


def test_zero3_on_two_processes_matches_plain_pytorch(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    config = run_config(corpus, stages=[stage(zeroStage=3, budget={"steps": 20})])
    run = run_trainer(tmp_path, config, nproc=2)
    assert run.returncode == ExitCode.STAGE_COMPLETE, run.stderr
    assert_matches_plain_pytorch(run, config, steps=20)
    assert run.report is not None
    assert (run.report["step"], run.report["tokens"], run.report["worldSize"]) == (
        20,
        20 * 8 * 64,
        2,
    )
    assert Path(run.report["checkpoint"]).name == "step-20"
    final = Path(run.report["checkpoint"])
    assert (final / "manifest.json").is_file()
    assert (final.parent.parent / "latest").read_text().strip() == "stage-0/step-20"


# ZeRO 1 reduces at the boundary only (short ranks reach it sooner); ZeRO 3 reduces inside
# every backward (short ranks pad). ZeRO 0 and 2 take the same paths as 1 and 3.
@pytest.mark.parametrize("zero", [1, 3])
def test_an_uneven_split_over_three_processes_matches_plain_pytorch(
    corpus: dict[str, Path], tmp_path: Path, zero: int
) -> None:
    """16 sequences in micro-batches of 2 over 3 processes: ranks run 3, 3 and 2; ZeRO 2 and
    3 pad the short rank with a zero-weighted micro-step."""
    batch = {"globalBatchSize": 16, "microBatchSize": 2, "budget": {"steps": 20}}
    config = run_config(corpus, stages=[stage(zeroStage=zero, **batch)])
    run = run_trainer(tmp_path, config, nproc=3)
    assert run.returncode == ExitCode.STAGE_COMPLETE, run.stderr
    assert "micro-batches per rank 3/2 (89% efficient)" in run.stderr
    assert {
        (s["worldSize"], s["microBatchesMost"], s["microBatchesFewest"]) for s in run.steps
    } == {(3, 3, 2)}
    assert_matches_plain_pytorch(run, config, steps=20)
    assert run.report is not None
    assert run.report["tokens"] == 20 * 16 * 64


def test_training_on_a_real_corpus_lowers_the_loss(corpus: dict[str, Path], tmp_path: Path) -> None:
    # ZeRO-0 in fp32: the path where the trainer's own optimizer computes the norm and clips.
    config = run_config(
        corpus,
        stages=[
            stage(
                zeroStage=0,
                budget={"steps": 80},
                globalBatchSize=16,
                microBatchSize=8,
                lrSchedule={"warmupSteps": 5, "decay": "cosine"},
            )
        ],
    )
    run = run_trainer(tmp_path, config, nproc=1)
    assert run.returncode == 0, run.stderr
    first, last = run.losses[0], sum(run.losses[-10:]) / 10
    assert first > 5.0  # about ln(256): an untrained byte-level model
    assert last < 0.6 * first, run.losses
    assert all(0 < s["gradNorm"] < 100 for s in run.steps)
    assert not any(s["skipped"] for s in run.steps)


def _scrape(port: int, found: dict[str, Any], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            text = (
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
                .read()
                .decode()
            )
            step = re.search(r"^pretrainjob_step\{[^}]*\} (\S+)$", text, re.M)
            if step and float(step.group(1)) > 0:
                found["metrics"] = text
                found["healthz"] = urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/healthz", timeout=2
                ).status
                return
        except OSError:
            pass
        time.sleep(0.1)


def test_moe_trains_in_bf16_and_exports_expert_load(
    corpus: dict[str, Path], tmp_path: Path, free_port: int
) -> None:
    config = run_config(
        corpus,
        stages=[stage(zeroStage=2, precision="bf16", budget={"steps": 60})],
    )
    config["model"]["moe"] = {"experts": 4, "topK": 2, "auxLossCoef": 0.01}
    found: dict[str, Any] = {}
    stop = threading.Event()
    scraper = threading.Thread(target=_scrape, args=(free_port, found, stop))
    scraper.start()
    try:
        run = run_trainer(tmp_path, config, nproc=2, env={"PRETRAIN_METRICS_PORT": str(free_port)})
    finally:
        stop.set()
        scraper.join()
    assert run.returncode == 0, run.stderr
    assert all(s["auxLoss"] == s["auxLoss"] and s["auxLoss"] < 10 for s in run.steps)
    assert all(abs(sum(s["expertLoad"]) - 1) < 1e-3 for s in run.steps)
    assert sum(run.losses[-5:]) < sum(run.losses[:5])
    assert "metrics" in found, "no metrics were scraped while the trainer ran"
    for name in (
        "pretrainjob_loss",
        "pretrainjob_tokens_total",
        "pretrainjob_tokens_per_second",
        "pretrainjob_step_seconds_bucket",
        "pretrainjob_learning_rate",
        "pretrainjob_grad_norm",
        "pretrainjob_skipped_steps_total",
        "pretrainjob_world_size",
        'pretrainjob_moe_expert_load{expert="3"',
    ):
        assert name in found["metrics"], name
    assert found["healthz"] == 200


def test_next_stage_starts_from_the_previous_stages_final_weights(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    stages = [stage(budget={"steps": 30}), stage(name="enhancement", budget={"steps": 5})]
    config = run_config(corpus, stages=stages)
    first = run_trainer(tmp_path, config, nproc=1, stage_index=0)
    assert first.returncode == 0, first.stderr
    second = run_trainer(tmp_path, config, nproc=1, stage_index=1)
    assert second.returncode == 0, second.stderr
    assert "restored weights from" in second.stderr
    assert "stage-0/step-30" in second.stderr
    fresh = reference_losses(config, steps=1)[0]
    assert second.losses[0] < fresh - 0.5  # it starts trained, not from scratch
    assert second.report is not None
    assert second.report["stageName"] == "enhancement"


def test_guard_skips_steps_under_deepspeed_and_counts_them(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    # A spike factor far below 1 makes every step after the first few a "spike".
    config = run_config(corpus, stages=[stage(zeroStage=1, budget={"steps": 12})])
    config["trainer"]["spikeFactor"] = 1e-6
    run = run_trainer(tmp_path, config, nproc=1)
    assert run.returncode == 0, run.stderr
    assert [s["skipped"] for s in run.steps] == [False] * 5 + [True] * 7
    assert run.report is not None
    assert run.report["skippedSteps"] == 7


def _permanent(run: Any, *words: str) -> None:
    assert run.returncode == ExitCode.PERMANENT, run.stderr
    assert "Traceback" not in run.stderr
    line = [ln for ln in run.stderr.splitlines() if "permanent error" in ln]
    assert line, run.stderr
    text = run.stderr[run.stderr.index(line[0]) :]
    for word in words:
        assert word in text, text


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ("missing shard", ("data source 'code'", "nowhere", "no such shard")),
        ("bad header", ("header", "not valid JSON")),
        (
            "batch not whole micro-batches",
            ("stages[0].globalBatchSize", "(6) is not divisible by microBatchSize (4)"),
        ),
        ("unknown field", ("invalid run config", "stages[0].bogus: unknown field")),
        ("stage out of range", ("stage index 5 out of range",)),
        (
            "layout that does not fit the model",
            ("stages[0].parallelism.tensor", "(3) does not divide model.heads (4)"),
        ),
        (
            "world that is not whole replicas",
            ("world size 1 is not whole replicas of tensor x pipeline = 2 processes",),
        ),
    ],
)
def test_bad_input_fails_permanently_with_one_clear_message(
    corpus: dict[str, Path], tmp_path: Path, change: str, words: tuple[str, ...]
) -> None:
    config = run_config(corpus, stages=[stage()])
    env = {"WORLD_SIZE": "1"}
    stage_index = 0
    if change == "missing shard":
        config["data"]["sources"][0]["path"] = str(tmp_path / "nowhere")
    elif change == "bad header":
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "tokens.json").write_text("{not json")
        (broken / "tokens.bin").write_bytes(b"\0" * 64)
        config["data"]["sources"][0]["path"] = str(broken)
    elif change == "batch not whole micro-batches":
        config["stages"][0].update(globalBatchSize=6, microBatchSize=4)
    elif change == "unknown field":
        config["stages"][0]["bogus"] = 1
    elif change == "layout that does not fit the model":
        config["stages"][0]["parallelism"] = {"tensor": 3}
    elif change == "world that is not whole replicas":
        config["stages"][0]["parallelism"] = {"pipeline": 2}
    else:
        stage_index = 5
    run = run_trainer(tmp_path, config, stage_index=stage_index, env=env, torchrun=False)
    _permanent(run, *words)
    # The report says so too: under torchrun it is the only place the code survives.
    assert run.report is not None
    assert (run.report["finished"], run.report["exitCode"]) == (False, ExitCode.PERMANENT)
    assert words[0] in run.report["error"]


def test_missing_environment_is_a_permanent_error(tmp_path: Path) -> None:
    run = run_trainer(tmp_path, {}, env={"PRETRAIN_JOB": ""}, torchrun=False)
    _permanent(run, "PRETRAIN_JOB")


def test_step_log_records_are_json_lines(corpus: dict[str, Path], tmp_path: Path) -> None:
    run = run_trainer(
        tmp_path, run_config(corpus, stages=[stage(budget={"steps": 3})]), torchrun=False
    )
    assert run.returncode == 0, run.stderr
    assert [s["step"] for s in run.steps] == [1, 2, 3]
    fields = {"stage", "step", "tokens", "loss", "lr", "gradNorm", "skipped", "seconds", "time"}
    assert all(fields <= record.keys() for record in run.steps)
    assert [s["tokens"] for s in run.steps] == [1 * 8 * 64, 2 * 8 * 64, 3 * 8 * 64]
    assert {s["worldSize"] for s in run.steps} == {1}
