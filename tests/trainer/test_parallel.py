"""Parallel layouts under real DeepSpeed on CPU: each matches a plain single-process loop of the
same model, data and optimizer; restarts change only the data-parallel degree; the stage
hand-over crosses layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pretrain_trainer.ckpt.layout import RANK_FILE_GLOB, WEIGHTS
from pretrain_trainer.config import BatchSplit, RunConfig
from pretrain_trainer.contract import ExitCode
from pretrain_trainer.data import build_stdlib_corpus
from pretrain_trainer.data.loader import DataLoader
from pretrain_trainer.train import build_model, lm_loss

from tests.trainer.harness import (
    Run,
    preempt_after,
    reference_run,
    run_config,
    run_trainer,
    stage,
    start_trainer,
)

pytestmark = pytest.mark.slow

PIPELINE = {"pipeline": 2, "pipelineLayers": [1, 3]}  # uneven: the split is the layout's
MOE = {"experts": 4, "topK": 2, "auxLossCoef": 0.01}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus"))


def _config(corpus: dict[str, Path], *stages: dict[str, Any], **model: Any) -> dict[str, Any]:
    config = run_config(corpus, stages=list(stages))
    config["model"].update(layers=4, **model)
    return config


def _worst(run: Run, expected: list[float]) -> float:
    assert len(run.losses) == len(expected)
    return max(abs(a - b) for a, b in zip(run.losses, expected, strict=True))


def _assert_matches_plain_pytorch(run: Run, config: dict[str, Any]) -> None:
    """Losses to 1e-5 of the single-process loop over 20 steps, and gradient norms typically
    to 1e-5 and each to 1e-3: clipping and the stability guard see the norm of the whole model,
    not one rank's part (which would be off by tens of percent). One step's norm may lie
    further off than the rest where its batch is ill-conditioned: fp32 sums in another order
    (three micro-batches split 2/1, heads over two ranks) then differ by up to 1.6e-4 at
    that step alone, and the steps after it agree to 1e-6 again."""
    assert run.returncode == ExitCode.STAGE_COMPLETE, run.stderr
    expected, norms = reference_run(config, steps=20)
    assert _worst(run, expected) <= 1e-5
    seen = [s["gradNorm"] for s in run.steps]
    errors = sorted(abs(a - b) / b for a, b in zip(seen, norms, strict=True))
    assert errors[len(errors) // 2] <= 1e-5, errors
    assert errors[-1] <= 1e-3, errors


def test_pipeline_2_matches_plain_pytorch_over_20_steps(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    config = _config(corpus, stage(parallelism=PIPELINE, budget={"steps": 20}))
    run = run_trainer(tmp_path, config, nproc=2)
    _assert_matches_plain_pytorch(run, config)
    assert run.report is not None
    assert run.report["worldSize"] == 2


def test_pipeline_2_by_data_2_with_experts_and_tied_embeddings_matches_plain_pytorch(
    corpus: dict[str, Path], tmp_path: Path
) -> None:
    """Four processes: two pipelines of two stages. The MoE balance loss of the first stage's
    blocks reaches the loss on the last; the tied embedding's gradient joins both ends."""
    config = _config(
        corpus, stage(parallelism=PIPELINE, budget={"steps": 20}), moe=MOE, tieEmbeddings=True
    )
    run = run_trainer(tmp_path, config, nproc=4)
    assert run.returncode == ExitCode.STAGE_COMPLETE, run.stderr
    assert "micro-batches per rank 2" in run.stderr  # 4 micro-batches over 2 pipelines
    assert _worst(run, reference_run(config, steps=20)[0]) <= 1e-5


@pytest.mark.parametrize(
    ("nproc", "fields"),
    [
        (2, {"zeroStage": 1}),
        # Two tensor groups, 3 micro-batches split 2/1: ZeRO-2 pads the short group in step.
        (4, {"zeroStage": 2, "globalBatchSize": 6}),
    ],
    ids=["tensor-2", "tensor-2-by-data-2-uneven-zero2"],
)
def test_tensor_parallelism_matches_plain_pytorch_over_20_steps(
    corpus: dict[str, Path], tmp_path: Path, nproc: int, fields: dict[str, Any]
) -> None:
    """Heads, key/value heads and the feed-forward width split over two ranks (grouped-query
    attention: 4 heads over 2 key/value heads)."""
    layout = stage(parallelism={"tensor": 2}, budget={"steps": 20}, **fields)
    config = _config(corpus, layout, kvHeads=2)
    run = run_trainer(tmp_path, config, nproc=nproc)
    _assert_matches_plain_pytorch(run, config)


@pytest.mark.parametrize(
    ("nproc", "fields"),
    [
        (2, {"parallelism": {"expert": 2}}),
        # 3 micro-batches over 2 ranks: the short one pads, its tokens still meet the experts.
        (2, {"parallelism": {"expert": 2}, "zeroStage": 2, "globalBatchSize": 6}),
        # The example's layout: two pipelines of 2 stages, each stage's experts over both.
        (4, {"parallelism": {"expert": 2, **PIPELINE}}),
    ],
    ids=["expert-2", "expert-2-uneven-zero2", "pipeline-2-expert-2"],
)
def test_expert_parallelism_matches_plain_pytorch_over_20_steps(
    corpus: dict[str, Path], tmp_path: Path, nproc: int, fields: dict[str, Any]
) -> None:
    """Each rank holds 2 of the 4 experts; the reference holds all 4 in one process. The
    experts' outputs and gradients are summed in another order across ranks (1e-7 apart), and
    a token whose two best experts are that close may switch experts, after which the runs
    part: at the harness's lr 3e-3 one did at step 8 (5e-4 apart by step 20); at 1e-3 none
    does in 20 steps."""
    config = _config(corpus, stage(budget={"steps": 20}, optimizer={"lr": 1e-3}, **fields), moe=MOE)
    run = run_trainer(tmp_path, config, nproc=nproc)
    _assert_matches_plain_pytorch(run, config)
    assert all(len(s["expertLoad"]) == 4 for s in run.steps)


@pytest.mark.parametrize(
    ("layout", "moe", "how"),
    [
        (PIPELINE, None, "converted to the universal format"),
        ({"tensor": 2}, None, "converted to the universal format"),
        ({"expert": 2}, MOE, "goes back parameter by parameter"),
    ],
    ids=["pipeline-2", "tensor-2", "expert-2"],
)
def test_a_layout_restarted_at_another_data_parallel_degree_resumes_within_1e_5(
    corpus: dict[str, Path],
    tmp_path: Path,
    layout: dict[str, Any],
    moe: dict[str, Any] | None,
    how: str,
) -> None:
    """4 processes, stopped, then 2: half the data-parallel degree, the same layout. The
    checkpoint goes through the universal format, or, with experts spread over ranks (which
    DeepSpeed's converter cannot reshard), back into the engine parameter by parameter."""
    fields = {"optimizer": {"lr": 1e-3}} if moe else {}
    config = _config(
        corpus,
        stage(parallelism=layout, budget={"steps": 20}, **fields),
        hidden=128,
        **({"moe": moe} if moe else {}),
    )
    config["checkpoint"] = {"intervalSteps": 5, "preemptionMinAgeSeconds": 0}
    first = preempt_after(start_trainer(tmp_path, config, nproc=4), step=6)
    stopped = first.steps[-1]["step"]
    assert stopped < 20
    second = run_trainer(tmp_path, config, nproc=2)
    assert second.returncode == ExitCode.STAGE_COMPLETE, second.stderr
    assert how in second.stderr
    assert second.steps[0]["step"] == stopped + 1
    resumed = {s["step"]: s["loss"] for run in (first, second) for s in run.steps}
    expected = reference_run(config, steps=20)[0]
    assert sorted(resumed) == list(range(1, 21))
    assert max(abs(resumed[s] - loss) for s, loss in enumerate(expected, start=1)) <= 1e-5


def _evaluated(config: dict[str, Any], checkpoint: Path, *, stage_index: int) -> float:
    """The mean loss of a checkpoint's full fp32 weights on a stage's first global batch, in
    one process: what that stage's first step must report."""
    parsed = RunConfig.parse(config)
    stage_ = parsed.stages[stage_index]
    model = build_model(parsed, stage_)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted((checkpoint / WEIGHTS).glob(RANK_FILE_GLOB)):
        state.update(torch.load(shard, weights_only=True))
    model.load_state_dict(state, strict=False)
    assert {n for n, _ in model.named_parameters()} <= set(state)
    data = DataLoader.build(parsed, stage_index=stage_index)
    whole = BatchSplit(stage_.global_batch_size // stage_.micro_batch_size, 1)
    batches = data.next_batch(rank=0, split=whole, device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        coef = parsed.model.moe.aux_loss_coef if parsed.model.moe else 0.0
        losses = [
            float(lm_loss(model(x), y, label_smoothing=0.0) + coef * model.aux_loss())
            for x, y in batches
        ]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    ("layouts", "moe"),
    [
        ([PIPELINE, {"tensor": 2}, {"pipeline": 2}, {}], None),
        ([{"expert": 2, **PIPELINE}, {"expert": 2}, {"pipeline": 2}, {}], MOE),
    ],
    ids=["pipeline-tensor-pipeline-data", "experts-over-pipelines-experts-pipeline-data"],
)
def test_the_stage_hand_over_crosses_layouts(
    corpus: dict[str, Path],
    tmp_path: Path,
    layouts: list[dict[str, Any]],
    moe: dict[str, Any] | None,
) -> None:
    """Each stage starts from the previous one's full fp32 weights, whatever either's layout
    (4 processes where experts spread over pipelines, else 2)."""
    names = ["foundation", "enhancement", "instruction", "review"]
    stages = [
        stage(name=name, budget={"steps": 10 if i == 0 else 3}, parallelism=layout)
        for i, (name, layout) in enumerate(zip(names, layouts, strict=True))
    ]
    config = _config(corpus, *stages, **({"moe": moe} if moe else {}))
    finals: list[Path] = []
    for index, layout in enumerate(layouts):
        nproc = 4 if layout.get("expert", 1) * layout.get("pipeline", 1) > 2 else 2
        run = run_trainer(tmp_path, config, nproc=nproc, stage_index=index)
        assert run.returncode == ExitCode.STAGE_COMPLETE, run.stderr
        if finals:
            assert "starts from the final weights of" in run.stderr
            first = _evaluated(config, finals[-1], stage_index=index)
            assert abs(run.losses[0] - first) <= 1e-5
        assert run.report is not None
        finals.append(Path(run.report["checkpoint"]))
