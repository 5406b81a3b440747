"""Tensor parallelism through DeepSpeed's AutoTP training (``dsconfig.tensor_parallel``).

``deepspeed.initialize`` replaces the projections named by the specs with DeepSpeed's
tensor-parallel layers and shards their weights over the tensor group (consecutive ranks, as
``config.parallel`` numbers them); the model needs no other change, since attention reads its
local head counts from the projections' widths. What DeepSpeed keeps to itself is the
reverse: :func:`gather_full` puts a parameter's shards back together, under its own name, for
the full fp32 weights a stage ends with (so the next stage may use another layout).
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from ..dsconfig import TENSOR_COLUMN, TENSOR_ROW, TENSOR_STACKED

_ROW = [re.compile(p) for p in TENSOR_ROW]
_COLUMN = [re.compile(p) for p in TENSOR_COLUMN]
_STACKED = [re.compile(p) for p in TENSOR_STACKED]


def _matches(patterns: list[re.Pattern[str]], name: str) -> bool:
    return any(p.match(name) for p in patterns)


def gather_full(name: str, shard: torch.Tensor) -> torch.Tensor:
    """The whole of parameter ``name`` from this rank's ``shard`` of it (collective over the
    tensor group: every rank of the group calls it for the same parameters in the same
    order); a parameter the specs do not split is returned as it is."""
    from deepspeed.utils import groups

    row, column, stacked = (_matches(p, name) for p in (_ROW, _COLUMN, _STACKED))
    if not (row or column or stacked):
        return shard
    group = groups.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    if row:
        return torch.cat(parts, dim=1)
    if column:
        return torch.cat(parts, dim=0)
    halves = [part.chunk(2, dim=0) for part in parts]  # each rank: [a_r; b_r]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
