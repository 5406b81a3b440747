"""The pure arithmetic of the trainer's config: lr schedules, batch splits, model sizes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pretrain_trainer.config import (
    BatchSplit,
    LRSchedule,
    ModelConfig,
    MoE,
    Stage,
    WorldSizeError,
    fewest_ranks_as_fast,
)

LR = 1e-3


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        (LRSchedule(warmup_steps=10, decay="constant"), 0, LR / 10),
        (LRSchedule(warmup_steps=10, decay="constant"), 4, LR / 2),
        (LRSchedule(warmup_steps=10, decay="constant"), 99, LR),
        (LRSchedule(decay="cosine", final_lr=1e-4), 0, LR),
        (LRSchedule(decay="cosine", final_lr=1e-4), 50, (LR + 1e-4) / 2),
        (LRSchedule(decay="cosine", final_lr=1e-4), 100, 1e-4),
        (LRSchedule(decay="cosine"), 100, LR / 10),  # default final lr
        (LRSchedule(decay="linear", final_lr=0.0), 25, 0.75 * LR),
        (LRSchedule(decay="linear", final_lr=0.0, decay_fraction=0.2), 79, LR),  # stable phase
        (LRSchedule(decay="linear", final_lr=0.0, decay_fraction=0.2), 90, LR / 2),
        (LRSchedule(decay="step", final_lr=1e-5), 79, LR),
        (LRSchedule(decay="step", final_lr=1e-5), 80, 1e-4),  # one of two drops
        (LRSchedule(decay="step", final_lr=1e-5), 95, 1e-5),
        (LRSchedule(decay="step", final_lr=1e-5, milestones=[0.5]), 60, 1e-5),
        (LRSchedule(warmup_steps=20, decay="linear", final_lr=0.0), 60, LR / 2),
    ],
)
def test_lr_schedule(schedule: LRSchedule, step: int, expected: float) -> None:
    assert math.isclose(schedule.lr_at(step, total_steps=100, lr=LR), expected, rel_tol=1e-9)


@given(
    decay=st.sampled_from(["constant", "cosine", "linear", "step"]),
    warmup=st.integers(0, 50),
    total=st.integers(51, 500),
)
def test_lr_never_exceeds_peak_nor_falls_below_final(decay: str, warmup: int, total: int) -> None:
    schedule = LRSchedule(warmup_steps=warmup, decay=decay, final_lr=None)  # type: ignore[arg-type]
    final = schedule.final_lr_for(LR)
    rates = [schedule.lr_at(s, total_steps=total, lr=LR) for s in range(total)]
    assert max(rates) <= LR * (1 + 1e-12)
    assert min(rates[warmup:]) >= final * (1 - 1e-12)
    assert all(
        b <= a * (1 + 1e-12) for a, b in zip(rates[warmup:], rates[warmup + 1 :], strict=False)
    )


def test_llama_7b_shape_has_its_published_parameter_count() -> None:
    model = ModelConfig(
        layers=32, hidden=4096, heads=32, ffn_hidden=11008, vocab_size=32000, seq_len=4096
    )
    assert model.num_params() == 6_738_415_616


def test_moe_counts_all_experts_but_activates_top_k() -> None:
    dense = ModelConfig(layers=4, hidden=256, heads=4, vocab_size=1000, seq_len=64)
    moe = dense.model_copy(update={"moe": MoE(experts=8, top_k=2)})
    expert = 3 * 256 * dense.ffn_width
    router = 256 * 8
    assert moe.num_params() - dense.num_params() == 4 * (7 * expert + router)
    assert moe.num_params(active=True) - dense.num_params() == 4 * (expert + router)


def test_default_ffn_width_is_eight_thirds_rounded_to_256() -> None:
    assert ModelConfig(layers=1, hidden=4096, heads=32, vocab_size=8, seq_len=8).ffn_width == 11008


def test_a_stage_splits_its_batch_at_any_world_size_and_refuses_part_micro_batches() -> None:
    stage = Stage.model_validate(
        {
            "name": "s",
            "budget": {"steps": 1},
            "dataMix": {"a": 1},
            "globalBatchSize": 16,
            "microBatchSize": 2,
        }
    )
    three = stage.split(3)
    assert [three.count(r) for r in range(3)] == [3, 3, 2]
    assert (three.most, three.fewest, three.even) == (3, 2, False)
    assert three.efficiency == pytest.approx(8 / 9)
    assert [stage.split(w).most for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert all(stage.split(w).even for w in (1, 2, 4, 8))
    with pytest.raises(WorldSizeError, match="not whole micro-batches of 2 over world size 0"):
        stage.split(0)
    odd = stage.model_copy(update={"global_batch_size": 15})
    with pytest.raises(WorldSizeError, match="globalBatchSize 15 is not whole micro-batches"):
        odd.split(1)


@given(micro_batches=st.integers(1, 5000), ranks=st.integers(1, 300))
def test_a_split_covers_the_batch_contiguously_and_weights_it_exactly(
    micro_batches: int, ranks: int
) -> None:
    split = BatchSplit(micro_batches, ranks)
    counts = [split.count(r) for r in range(ranks)]
    assert sum(counts) == micro_batches
    assert (max(counts), min(counts)) == (split.most, split.fewest)
    assert split.most - split.fewest <= 1
    assert [split.first(r) for r in range(ranks)] == [sum(counts[:r]) for r in range(ranks)]
    # Gradients are averaged over the ranks: each micro-batch then counts 1 / micro_batches.
    assert split.weight() / ranks == pytest.approx(1 / micro_batches)
    assert split.efficiency == pytest.approx(sum(counts) / (ranks * max(counts)))
    fewest = fewest_ranks_as_fast(micro_batches, ranks)
    assert fewest <= ranks
    assert BatchSplit(micro_batches, fewest).most == split.most
    assert fewest == 1 or BatchSplit(micro_batches, fewest - 1).most > split.most


def test_token_budget_rounds_up_to_whole_steps() -> None:
    model = ModelConfig(layers=1, hidden=8, heads=2, vocab_size=8, seq_len=100)
    stage = Stage.model_validate(
        {"name": "s", "budget": {"tokens": 1001}, "dataMix": {"a": 1}, "globalBatchSize": 10}
    )
    assert stage.tokens_per_step(model) == 1000
    assert stage.total_steps(model) == 2
