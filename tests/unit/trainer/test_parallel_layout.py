"""The rank layout of a parallel stage, and the tensor-parallel specs over the model's names."""

from __future__ import annotations

import re

import pytest
from pretrain_trainer.config import Layout, ModelConfig, MoE, Parallelism, Stage, WorldSizeError
from pretrain_trainer.dsconfig import (
    TENSOR_COLUMN,
    TENSOR_ROW,
    TENSOR_STACKED,
    deepspeed_config,
)
from pretrain_trainer.model import Transformer

LAYOUT = Layout(tensor=2, pipeline=2, expert=2, data=4)  # 16 ranks


def _partition(groups: list[list[int]], world: int) -> bool:
    return sorted(r for g in groups for r in g) == list(range(world))


def test_ranks_number_tensor_innermost_then_pipeline_then_data() -> None:
    for rank in range(LAYOUT.world_size):
        c = LAYOUT.coordinates(rank)
        assert LAYOUT.rank(data=c.data, pipeline=c.pipeline, tensor=c.tensor) == rank
    # A worker of 4 processes holds one whole replica: tensor x pipeline = 4.
    assert {LAYOUT.coordinates(r).data for r in range(4)} == {0}
    with pytest.raises(ValueError, match="not in a world of size 16"):
        LAYOUT.coordinates(16)


def test_each_kind_of_group_partitions_the_world() -> None:
    for groups in (
        LAYOUT.data_groups(),
        LAYOUT.expert_groups(),
        LAYOUT.expert_data_groups(),
    ):
        assert _partition(groups, LAYOUT.world_size)
    assert LAYOUT.data_groups()[0] == [0, 4, 8, 12]


def test_expert_groups_are_consecutive_data_parallel_ranks_and_their_holders_strided() -> None:
    assert LAYOUT.expert_groups()[:2] == [[0, 4], [8, 12]]
    assert LAYOUT.expert_data_groups()[:2] == [[0, 8], [4, 12]]
    for rank in range(LAYOUT.world_size):
        group = next(g for g in LAYOUT.expert_groups() if rank in g)
        assert group.index(rank) == LAYOUT.coordinates(rank).expert


def test_a_world_that_is_not_whole_replicas_has_no_layout() -> None:
    with pytest.raises(ValueError, match="not whole replicas of 4"):
        Layout.of(Parallelism(tensor=2, pipeline=2), 6)
    assert Parallelism(tensor=2).world_problem(6, micro_batches=8) is None
    assert "multiple of expert (2)" in str(Parallelism(expert=2).world_problem(3, micro_batches=8))
    assert "split evenly" in str(Parallelism(pipeline=2).world_problem(6, micro_batches=8))


def test_the_tensor_parallel_specs_split_every_block_matrix_and_nothing_else() -> None:
    config = ModelConfig(layers=2, hidden=32, heads=4, kv_heads=2, vocab_size=64, seq_len=16)
    kinds = {
        "row": [re.compile(p) for p in TENSOR_ROW],
        "column": [re.compile(p) for p in TENSOR_COLUMN],
        "stacked": [re.compile(p) for p in TENSOR_STACKED],
    }
    for name, param in Transformer(config).named_parameters():
        matched = [kind for kind, patterns in kinds.items() if any(p.match(name) for p in patterns)]
        if name.startswith("layers.") and param.dim() == 2:
            assert len(matched) == 1, name
        else:
            assert matched == [], name  # embedding, output layer and norms stay whole


def test_experts_stay_whole_under_tensor_parallelism() -> None:
    config = ModelConfig(
        layers=1, hidden=32, heads=4, vocab_size=64, seq_len=16, moe=MoE(experts=2)
    )
    patterns = [re.compile(p) for p in (*TENSOR_ROW, *TENSOR_COLUMN, *TENSOR_STACKED)]
    experts = [n for n, _ in Transformer(config).named_parameters() if ".experts." in n]
    assert experts
    assert not [n for n in experts if any(p.match(n) for p in patterns)]


def _stage(**fields: object) -> Stage:
    base: dict[str, object] = {
        "name": "s",
        "budget": {"steps": 1},
        "dataMix": {"a": 1},
        "globalBatchSize": 16,
        "microBatchSize": 2,
    }
    return Stage.model_validate({**base, **fields})


def test_the_deepspeed_config_accumulates_over_data_parallel_ranks_only() -> None:
    pipelined = deepspeed_config(_stage(parallelism={"pipeline": 2}), world_size=8)
    assert pipelined["gradient_accumulation_steps"] == 2  # 8 micro-batches over 4 pipelines
    assert "tensor_parallel" not in pipelined
    split = deepspeed_config(_stage(parallelism={"tensor": 2}), world_size=4)
    assert split["gradient_accumulation_steps"] == 4
    assert split["tensor_parallel"]["autotp_size"] == 2


def test_a_world_the_layout_cannot_split_is_a_permanent_world_size_error() -> None:
    with pytest.raises(WorldSizeError, match="must split evenly over the data-parallel degree 3"):
        deepspeed_config(_stage(parallelism={"pipeline": 2}), world_size=6)
    with pytest.raises(WorldSizeError, match="not whole replicas of tensor x pipeline = 2"):
        deepspeed_config(_stage(parallelism={"tensor": 2}), world_size=3)
