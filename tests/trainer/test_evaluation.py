"""Held-out evaluation under real DeepSpeed on CPU: the loss every layout reports is the one a
plain single-process pass over the same windows computes from the stage's final weights, at
any world size, and evaluating does not change what training computes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pretrain_trainer.ckpt.layout import RANK_FILE_GLOB, WEIGHTS
from pretrain_trainer.config import RunConfig
from pretrain_trainer.contract import ExitCode
from pretrain_trainer.data import build_stdlib_corpus, open_source, read_samples
from pretrain_trainer.evaluate import window_offsets
from pretrain_trainer.train import build_model

from tests.trainer.harness import Run, run_config, run_trainer, stage

pytestmark = pytest.mark.slow

STEPS, EVERY, BATCHES = 6, 3, 2


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus"), max_files=300)


def _config(corpus: dict[str, Path], **fields: Any) -> dict[str, Any]:
    evaluation = {"intervalSteps": EVERY, "batches": BATCHES}
    config = run_config(corpus, stages=[stage(budget={"steps": STEPS}, eval=evaluation, **fields)])
    config["data"]["evalSources"] = [
        {"name": name, "path": str(path / "eval")} for name, path in sorted(corpus.items())
    ]
    config["model"]["layers"] = 4
    return config


def _reference(workdir: Path, config: dict[str, Any]) -> dict[str, float]:
    """Each eval source's loss per token from the stage's final fp32 weights, in one process
    and one pass per window: no DeepSpeed, no sharding, no padding."""
    parsed = RunConfig.parse(config)
    model = build_model(parsed, parsed.stages[0]).eval()
    final = workdir / "checkpoints" / "test" / "stage-0" / f"step-{STEPS}" / WEIGHTS
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(final.glob(RANK_FILE_GLOB)):
        weights.update(torch.load(shard, weights_only=True))
    model.load_state_dict(weights, strict=False)
    stage_ = parsed.stages[0]
    seq_len = stage_.seq_len_for(parsed.model)
    losses = {}
    for source in parsed.data.eval_sources:
        tokens = open_source(source.path)
        offsets = window_offsets(
            len(tokens), seq_len=seq_len, count=BATCHES * stage_.global_batch_size
        )
        windows = read_samples(
            {source.name: tokens}, [(source.name, int(o)) for o in offsets], seq_len=seq_len
        )
        total = 0.0
        with torch.no_grad():
            for row in torch.from_numpy(windows):
                logits = model(row[None, :-1])
                total += float(F.cross_entropy(logits[0].double(), row[1:], reduction="sum"))
        losses[source.name] = total / (len(offsets) * seq_len)
    return losses


def _evaluated(run: Run) -> dict[int, dict[str, float]]:
    assert run.returncode == ExitCode.STAGE_COMPLETE, run.stderr
    return {s["step"]: s["evalLoss"] for s in run.steps if s.get("evalLoss")}


LAYOUTS = {
    "3 ranks ZeRO-1, uneven shares": ({"zeroStage": 1}, {}, 3),
    "2 ranks ZeRO-3, collective forwards": ({"zeroStage": 3}, {}, 2),
    "pipeline 2": ({"parallelism": {"pipeline": 2, "pipelineLayers": [1, 3]}}, {}, 2),
    "tensor 2": ({"parallelism": {"tensor": 2}}, {}, 2),
    "expert 2 of 4 experts": (
        {"parallelism": {"expert": 2}},
        {"moe": {"experts": 4, "topK": 2}},
        2,
    ),
}


@pytest.mark.parametrize(("fields", "model", "nproc"), LAYOUTS.values(), ids=LAYOUTS.keys())
def test_eval_loss_is_the_single_process_loss_of_the_same_windows(
    corpus: dict[str, Path],
    tmp_path: Path,
    fields: dict[str, Any],
    model: dict[str, Any],
    nproc: int,
) -> None:
    config = _config(corpus, **fields)
    config["model"].update(model)
    run = run_trainer(tmp_path, config, nproc=nproc)
    evaluated = _evaluated(run)
    assert sorted(evaluated) == [EVERY, STEPS]  # at the interval and at the stage's end
    expected = _reference(tmp_path, config)
    assert set(evaluated[STEPS]) == set(expected) == {"code", "prose"}
    for name, loss in expected.items():
        assert abs(evaluated[STEPS][name] - loss) <= 1e-5, (name, evaluated[STEPS], expected)
    assert evaluated[EVERY] != evaluated[STEPS]  # training moved the held-out loss
    assert run.report is not None
    assert run.report["evalLoss"] == evaluated[STEPS]


def test_evaluating_changes_nothing_training_computes(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    """Eval passes between steps draw no random numbers and touch no optimizer or routing
    state: with dropout on and experts routed, the losses are those of a run that never
    evaluates, and of the plain loop without dropout."""
    config = _config(corpus, dropout=0.1)
    config["model"]["moe"] = {"experts": 4, "topK": 2}
    plain = {**config, "data": {**config["data"], "evalSources": []}}
    plain["stages"] = [{k: v for k, v in config["stages"][0].items() if k != "eval"}]
    evaluated = run_trainer(tmp_path / "eval", config, nproc=2)
    assert _evaluated(evaluated)
    never = run_trainer(tmp_path / "never", plain, nproc=2)
    assert never.returncode == ExitCode.STAGE_COMPLETE, never.stderr
    assert not _evaluated(never)
    assert evaluated.losses == never.losses
    held_out = evaluated.report["evalLoss"] if evaluated.report else {}
    assert all(math.isfinite(v) and v < math.log(256) for v in held_out.values())


def test_an_eval_source_without_a_whole_window_fails_before_training(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(corpus)
    config["model"]["seqLen"] = 64
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    (tiny / "a.txt").write_text("short")
    from pretrain_trainer.data import prepare

    prepare([tiny], tmp_path / "tiny-shard")
    config["data"]["evalSources"][0]["path"] = str(tmp_path / "tiny-shard")
    run = run_trainer(tmp_path / "run", config, torchrun=False)
    assert run.returncode == ExitCode.PERMANENT, run.stderr
    assert run.report is not None
    assert "eval source 'code'" in run.report["error"]
    assert "hold no window of 65" in run.report["error"]
    assert not run.steps
