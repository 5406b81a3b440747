"""How one stage spreads its model over the processes of a world: its parallel layout.

``tensor x pipeline`` processes hold one copy of the model (a *replica*): each block's
matrices are split over the tensor ranks, the blocks over the pipeline stages. The rest of the
world is data parallel (ZeRO), and a resize changes only that degree. Experts of MoE layers are
spread over ``expert`` data-parallel ranks, so expert groups live inside the data-parallel
dimension and never change a replica's shape.

Ranks are numbered with tensor innermost, then pipeline, then data: a worker of
``nprocPerWorker`` processes (a multiple of ``tensor x pipeline``) holds whole replicas, so
losing a worker loses data-parallel ranks and never half a model. Pure arithmetic: no torch,
shared by the planner (which world sizes a layout allows) and the trainer (which groups each
rank joins).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from .base import Problem, Spec
from .model import ModelConfig

# DeepSpeed's pipeline engine refuses ZeRO 2 and 3 ("incompatible with pipeline parallelism"),
# and without ZeRO its gradient clipping measures only the first stage's gradients; its MoE
# layer refuses ZeRO 3.
PIPELINE_ZERO_STAGES = (1,)
# Without ZeRO in fp32 the trainer's optimizer clips and measures the gradient norm itself,
# which under tensor parallelism would be one shard's; ZeRO-3 with it is not built yet.
TENSOR_ZERO_STAGES = (1, 2)
EXPERT_ZERO_STAGES = (0, 1, 2)


class Parallelism(Spec):
    """The stage's parallel layout beside ZeRO data parallelism (all 1: data parallel only)."""

    tensor: Annotated[int, Field(ge=1, le=64)] = 1
    """Tensor-parallel degree: each block's attention heads and feed-forward width are split
    over this many processes. Divides heads, kvHeads and the feed-forward width; needs
    zeroStage 1 or 2, and no pipeline parallelism in the same stage."""
    pipeline: Annotated[int, Field(ge=1, le=256)] = 1
    """Pipeline stages: the blocks are split into this many consecutive runs, one per process.
    Divides model.layers unless pipelineLayers gives the split; needs zeroStage 1, and a
    data-parallel degree that divides the global batch's micro-batches."""
    pipeline_layers: Annotated[list[Annotated[int, Field(ge=1)]], Field(max_length=256)] | None = (
        None
    )
    """Blocks in each pipeline stage, first to last (e.g. [7, 9] puts fewer blocks beside the
    embedding); one entry per stage, summing to model.layers. Defaults to an even split."""
    expert: Annotated[int, Field(ge=1, le=4096)] = 1
    """Expert-parallel degree: each MoE layer's experts are spread over this many data-parallel
    ranks (tokens travel to their experts and back). Divides model.moe.experts and the
    data-parallel degree; needs zeroStage 0, 1 or 2."""

    @property
    def replica(self) -> int:
        """Processes holding one copy of the model: ``tensor x pipeline``."""
        return self.tensor * self.pipeline

    @property
    def trivial(self) -> bool:
        return self.tensor == self.pipeline == self.expert == 1

    def layer_split(self, layers: int) -> list[int]:
        """Blocks per pipeline stage, first to last."""
        if self.pipeline_layers is not None:
            return list(self.pipeline_layers)
        return [layers // self.pipeline] * self.pipeline

    def data_parallel(self, world_size: int) -> int:
        """The data-parallel degree at ``world_size`` processes (0 when the world is not whole
        replicas)."""
        return world_size // self.replica if world_size % self.replica == 0 else 0

    def world_problem(self, world_size: int, *, micro_batches: int) -> str | None:
        """Why this layout cannot run at ``world_size`` processes, or None when it can."""
        if world_size < 1 or world_size % self.replica:
            return (
                f"world size {world_size} is not whole replicas of tensor x pipeline "
                f"= {self.replica} processes"
            )
        data = world_size // self.replica
        if data % self.expert:
            return (
                f"data-parallel degree {data} (world size {world_size} / {self.replica}) is "
                f"not a multiple of expert ({self.expert})"
            )
        if self.pipeline > 1 and micro_batches % data:
            return (
                f"with pipeline {self.pipeline}, the {micro_batches} micro-batches of the global "
                f"batch must split evenly over the data-parallel degree {data}"
            )
        return None

    def describe(self) -> str:
        """One line for people: ``tensor 2 x pipeline 4 (layers 7,9,8,8), expert 8``."""
        parts = []
        if self.tensor > 1:
            parts.append(f"tensor {self.tensor}")
        if self.pipeline > 1:
            given = self.pipeline_layers
            split = f" (layers {','.join(map(str, given))})" if given else ""
            parts.append(f"pipeline {self.pipeline}{split}")
        if self.expert > 1:
            parts[-1:] = [", ".join([*parts[-1:], f"expert {self.expert}"])]
        return " x ".join(parts) if parts else "data parallel only"

    def problems(self, model: ModelConfig, *, zero_stage: int) -> Iterator[Problem]:
        yield from self._tensor_problems(model, zero_stage=zero_stage)
        yield from self._pipeline_problems(model, zero_stage=zero_stage)
        yield from self._expert_problems(model, zero_stage=zero_stage)

    def _tensor_problems(self, model: ModelConfig, *, zero_stage: int) -> Iterator[Problem]:
        if self.tensor == 1:
            return
        if self.pipeline > 1:
            yield Problem(
                ("tensor",), "tensor and pipeline parallelism in one stage are not built yet"
            )
        if zero_stage not in TENSOR_ZERO_STAGES:
            why = (
                "without ZeRO the trainer would clip by one shard's gradient norm"
                if zero_stage == 0
                else "ZeRO-3 with tensor parallelism is not built yet"
            )
            yield Problem(("tensor",), f"needs zeroStage 1 or 2, not {zero_stage}: {why}")
        for what, count in (
            ("model.heads", model.heads),
            ("model.kvHeads", model.kv_head_count),
            ("the feed-forward width", model.ffn_width),
        ):
            if count % self.tensor:
                yield Problem(("tensor",), f"({self.tensor}) does not divide {what} ({count})")

    def _pipeline_problems(self, model: ModelConfig, *, zero_stage: int) -> Iterator[Problem]:
        if self.pipeline_layers is not None:
            if len(self.pipeline_layers) != self.pipeline:
                yield Problem(
                    ("pipelineLayers",),
                    f"has {len(self.pipeline_layers)} entries; pipeline is {self.pipeline}",
                )
            elif sum(self.pipeline_layers) != model.layers:
                yield Problem(
                    ("pipelineLayers",),
                    f"sums to {sum(self.pipeline_layers)}; model.layers is {model.layers}",
                )
        elif self.pipeline > model.layers:
            yield Problem(("pipeline",), f"({self.pipeline}) exceeds model.layers ({model.layers})")
        elif model.layers % self.pipeline:
            yield Problem(
                ("pipeline",),
                f"({self.pipeline}) does not divide model.layers ({model.layers}); "
                "give the split in pipelineLayers",
            )
        if self.pipeline > 1 and zero_stage not in PIPELINE_ZERO_STAGES:
            yield Problem(
                ("pipeline",),
                f"needs zeroStage 1, not {zero_stage}: DeepSpeed's pipeline engine does "
                "not combine with ZeRO 2 or 3, and clips only one stage's gradients without ZeRO",
            )

    def _expert_problems(self, model: ModelConfig, *, zero_stage: int) -> Iterator[Problem]:
        if self.expert == 1:
            return
        if model.moe is None:
            yield Problem(("expert",), f"({self.expert}) needs model.moe: the model has no experts")
            return
        if model.moe.experts % self.expert:
            yield Problem(
                ("expert",),
                f"({self.expert}) does not divide model.moe.experts ({model.moe.experts})",
            )
        if self.tensor > 1:
            yield Problem(
                ("expert",), "tensor and expert parallelism in one stage are not built yet"
            )
        if zero_stage not in EXPERT_ZERO_STAGES:
            yield Problem(
                ("expert",),
                f"needs zeroStage 0, 1 or 2, not {zero_stage}: DeepSpeed's MoE layer "
                "does not combine with ZeRO 3",
            )


@dataclass(frozen=True)
class Coordinates:
    """Where one rank sits in a layout."""

    data: int
    pipeline: int
    tensor: int
    expert: int
    """The rank's place among its expert group (consecutive data-parallel ranks)."""


@dataclass(frozen=True)
class Layout:
    """A parallel layout at one world size: which rank holds which part of which replica."""

    tensor: int
    pipeline: int
    expert: int
    data: int

    @classmethod
    def of(cls, parallelism: Parallelism, world_size: int) -> Layout:
        data = parallelism.data_parallel(world_size)
        if not data:
            raise ValueError(
                f"world size {world_size} is not whole replicas of {parallelism.replica}"
            )
        return cls(parallelism.tensor, parallelism.pipeline, parallelism.expert, data)

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def rank(self, *, data: int, pipeline: int, tensor: int) -> int:
        return (data * self.pipeline + pipeline) * self.tensor + tensor

    def coordinates(self, rank: int) -> Coordinates:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not in a world of size {self.world_size}")
        tensor, rest = rank % self.tensor, rank // self.tensor
        pipeline, data = rest % self.pipeline, rest // self.pipeline
        return Coordinates(data, pipeline, tensor, data % self.expert)

    def data_groups(self) -> list[list[int]]:
        """Ranks holding the same part of the model: ZeRO reduces and partitions over these."""
        return [
            [self.rank(data=d, pipeline=p, tensor=t) for d in range(self.data)]
            for p in range(self.pipeline)
            for t in range(self.tensor)
        ]

    def expert_groups(self) -> list[list[int]]:
        """Ranks that spread one MoE layer's experts over them: consecutive data-parallel
        ranks of one model part."""
        return [
            group[start : start + self.expert]
            for group in self.data_groups()
            for start in range(0, self.data, self.expert)
        ]

    def expert_data_groups(self) -> list[list[int]]:
        """Ranks holding the same experts: expert gradients are reduced over these."""
        return [
            group[place :: self.expert]
            for group in self.data_groups()
            for place in range(self.expert)
        ]
