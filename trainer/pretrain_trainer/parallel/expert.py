"""Expert parallelism through DeepSpeed's MoE layer.

:func:`spread_experts` replaces each :class:`~pretrain_trainer.model.MoE` of the model (built
whole, its weights initialised or loaded as for any layout) with an :class:`ExpertParallelMoE`:
DeepSpeed's ``MoE`` holding this rank's ``experts / expert`` experts, copied from their
global indices, which moves each token to its experts' ranks and back (all-to-all over the
expert group). DeepSpeed marks the experts' parameters, so ZeRO reduces their gradients over
the ranks that hold the same experts and everything else over the whole data-parallel group.

Routing stays the model's: no capacity limit (``drop_tokens=False``), no random token
selection and no sampling of the second expert, so the layer computes what ``MoE`` computes.
The balance loss and the expert load are the model's too (``Routed.route``, from the same
router weights): DeepSpeed's own loss counts only first choices.

Process groups: DeepSpeed builds its expert groups assuming pipeline stages outermost in the
rank order; ours have data outermost (``config.parallel``), so :func:`expert_groups` creates
them from our :class:`~pretrain_trainer.config.Layout` first, under the names DeepSpeed
looks up.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.utils import groups
from torch import nn

from ..config import Layout
from ..model import MoE, Routed, SwiGLU, Transformer

_ROUTER = re.compile(r"^(.*\.mlp)\.moe\.deepspeed_moe\.gate\.wg\.(.*)$")
_EXPERT = re.compile(r"^(.*\.mlp)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(.*)$")


class ExpertParallelMoE(Routed):
    """One MoE layer whose experts are spread over an expert group; this rank holds experts
    ``first .. first + experts / size - 1``."""

    def __init__(self, ours: MoE, *, size: int, place: int) -> None:
        super().__init__(top_k=ours.top_k, n_experts=ours.n_experts)
        hidden, ffn = ours.router.in_features, cast(SwiGLU, ours.experts[0]).down.in_features
        self.moe = DeepSpeedMoE(
            hidden,
            expert=SwiGLU(hidden=hidden, ffn=ffn),
            num_experts=ours.n_experts,
            ep_size=size,
            k=ours.top_k,
            drop_tokens=False,
            use_rts=False,
            top2_2nd_expert_sampling=False,
        )
        local = self.moe.num_local_experts
        self.first = place * local
        with torch.no_grad():
            self.router.weight.copy_(ours.router.weight)
            for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                expert.load_state_dict(ours.experts[self.first + i].state_dict())
                for param, source in zip(
                    expert.parameters(), ours.experts[self.first + i].parameters(), strict=True
                ):
                    param.requires_grad_(source.requires_grad)
        self.router.weight.requires_grad_(ours.router.weight.requires_grad)

    @property
    def router(self) -> nn.Linear:
        gate: nn.Linear = self.moe.deepspeed_moe.gate.wg
        return gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The model's balance loss and load of this pass (the gate routes the same way).
        self.route(self.router(x.reshape(-1, x.shape[-1])))
        out: torch.Tensor = self.moe(x)[0]
        return out


def model_name(name: str, *, first: int) -> tuple[str, bool]:
    """A parameter's name in the whole :class:`Transformer`, and whether it is an expert's:
    DeepSpeed's ``...mlp.moe.deepspeed_moe.experts.deepspeed_experts.1.down.weight`` is the
    model's ``...mlp.experts.<first + 1>.down.weight``."""
    if found := _EXPERT.match(name):
        prefix, local, rest = found.groups()
        return f"{prefix}.experts.{first + int(local)}.{rest}", True
    if found := _ROUTER.match(name):
        return f"{found[1]}.router.{found[2]}", False
    return name, False


def expert_groups(layout: Layout, *, rank: int) -> None:
    """Create the expert groups of ``layout`` (every rank, in the same order) under the names
    DeepSpeed's MoE layers look up, before ``deepspeed.initialize``."""
    name = f"ep_size_{layout.expert}"
    if name in groups._get_expert_parallel_group_dict():
        return
    for kind, table, ranks in (
        ("parallel", groups._EXPERT_PARALLEL_GROUP, groups._EXPERT_PARALLEL_GROUP_RANKS),
        ("data", groups._EXPERT_DATA_PARALLEL_GROUP, groups._EXPERT_DATA_PARALLEL_GROUP_RANKS),
    ):
        members = layout.expert_groups() if kind == "parallel" else layout.expert_data_groups()
        for group_ranks in members:
            group = dist.new_group(group_ranks)
            if rank in group_ranks:
                table[name], ranks[name] = group, group_ranks


def spread_experts(model: Transformer, layout: Layout, *, rank: int) -> None:
    """Replace the model's MoE layers by expert-parallel ones holding this rank's experts."""
    expert_groups(layout, rank=rank)
    place = layout.coordinates(rank).expert
    for block in model.layers:
        if isinstance(block.mlp, MoE):
            block.mlp = ExpertParallelMoE(block.mlp, size=layout.expert, place=place)


def restore_optimizer(
    engine: Any, directory: Path, *, old_data: int, layout: Layout, rank: int
) -> None:
    """Put a checkpoint's fp32 weights and Adam moments back into ``engine`` parameter by
    parameter, when it was written at another data-parallel degree (call after
    ``engine.load_checkpoint(..., load_optimizer_states=False)``, which loads the weights,
    experts included, at any degree).

    DeepSpeed cannot: its ZeRO refuses optimizer state of another data-parallel degree, and
    its universal converter does not know its own MoE layer's expert partitions. Each ZeRO
    file holds, per parameter group, this rank's slice of the flat fp32 weights and moments
    and where each parameter lies in it (``param_slice_mappings``): the slices of the ranks
    that shared a parameter (every data-parallel rank for the rest, the ranks holding the same
    experts for an expert's) are joined in rank order, and DeepSpeed's own setters place them
    in the new partitions."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    place = layout.coordinates(rank).expert
    pieces: dict[tuple[int | None, str], dict[str, list[torch.Tensor]]] = {}
    step: Any = None
    for old in range(old_data):
        path = engine._get_rank_zero_ckpt_name(
            str(directory.parent),
            directory.name,
            engine.checkpoint_mp_rank,
            old,
            engine.bfloat16_enabled(),
        )
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        state = saved["optimizer_state_dict"]
        moments = state["base_optimizer_state"]["state"]
        for group, mapping in enumerate(state["param_slice_mappings"]):
            flat = {
                "fp32": state["single_partition_of_fp32_groups"][group],
                "exp_avg": moments[group]["exp_avg"],
                "exp_avg_sq": moments[group]["exp_avg_sq"],
            }
            step = moments[group]["step"]
            for name, where in mapping.items():
                key = (old % layout.expert if _EXPERT.match(name) else None, name)
                for kind, tensor in flat.items():
                    part = tensor.narrow(0, where.start, where.numel)
                    pieces.setdefault(key, {}).setdefault(kind, []).append(part)
    zero = engine.optimizer
    for partition in zero.single_partition_of_fp32_groups:  # a fresh optimizer has no state
        zero.optimizer.state[partition] = {
            "step": torch.tensor(float(step)),
            "exp_avg": torch.zeros_like(partition),
            "exp_avg_sq": torch.zeros_like(partition),
        }
    for i, partition in enumerate(zero.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], partition, zero.optimizer.state)
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        found = pieces[(place if _EXPERT.match(name) else None, name)]
        whole = {kind: torch.cat(parts).view_as(param) for kind, parts in found.items()}
        safe_set_full_fp32_param(param, whole["fp32"])
        safe_set_full_optimizer_state(param, whole["exp_avg"], "exp_avg")
        safe_set_full_optimizer_state(param, whole["exp_avg_sq"], "exp_avg_sq")
    # The schedule came back with the engine's state; the rates it set live in the optimizer
    # state that was not loaded.
    for group, lr in zip(zero.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
