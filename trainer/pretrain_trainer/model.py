"""The decoder-only transformer trained by every stage: RoPE, RMSNorm, SwiGLU, optional MoE.

Module names follow :data:`pretrain_trainer.config.MODULE_ROOTS` (``embed``, ``layers.<i>``,
``norm``, ``head``) because stages freeze parameters by these prefixes.

The MoE layer routes each token to its top-k experts and adds a Switch-style load-balancing
loss; here every rank holds every expert, and ``parallel.expert`` spreads them over ranks.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig

IGNORE = -100
"""A target that counts in no loss (cross-entropy's ``ignore_index``): padding rows."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(*, head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); rotate interleaved halves.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, *, dropout: float) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_head_count
        self.head_dim = config.head_dim
        self.q = nn.Linear(config.hidden, config.hidden, bias=False)
        self.kv = nn.Linear(config.hidden, 2 * self.kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(config.hidden, config.hidden, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # Head counts come from the projections' widths: under tensor parallelism each rank
        # holds a contiguous share of the heads (and of the key/value heads they attend with).
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, -1, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        y = self.out(y.transpose(1, 2).reshape(batch, seq, -1))
        return F.dropout(y, self.dropout, self.training)


class SwiGLU(nn.Module):
    def __init__(self, *, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        out: torch.Tensor = self.down(F.silu(gate) * up)
        return out


class Routed(nn.Module):
    """A feed-forward layer that routes each token to its top-k experts; ``aux_loss`` and
    ``load`` describe the last forward pass, whoever computes the experts (:class:`MoE` here,
    ``parallel.expert`` across ranks)."""

    def __init__(self, *, top_k: int, n_experts: int) -> None:
        super().__init__()
        self.top_k, self.n_experts = top_k, n_experts
        self.aux_loss = torch.zeros(())
        self.load = torch.zeros(n_experts)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's renormalised top-k weights and experts, from the router's logits; the
        balance loss and load of this pass are set from them."""
        probs = F.softmax(logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        # Switch-Transformer balance loss: fraction routed x mean router probability, per expert.
        routed = F.one_hot(chosen, self.n_experts).sum(1).float().mean(0) / self.top_k
        self.aux_loss = self.n_experts * (routed * probs.mean(0)).sum()
        self.load = routed.detach()
        return weights / weights.sum(-1, keepdim=True), chosen


class MoE(Routed):
    """Top-k routed experts, every expert on every rank."""

    def __init__(self, config: ModelConfig) -> None:
        assert config.moe is not None
        super().__init__(top_k=config.moe.top_k, n_experts=config.moe.experts)
        self.router = nn.Linear(config.hidden, self.n_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(hidden=config.hidden, ffn=config.ffn_width) for _ in range(self.n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, chosen = self.route(self.router(tokens))
        weights = weights.type_as(tokens)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            # Run every expert, even on no tokens: each parameter then gets a (zero) gradient
            # on every rank, which ZeRO's gradient reduction requires to stay in lockstep.
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            out.index_add_(0, rows, expert(tokens[rows]) * weights[rows, slot, None])
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, *, dropout: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden, eps=config.norm_eps)
        self.attn = Attention(config, dropout=dropout)
        self.mlp_norm = RMSNorm(config.hidden, eps=config.norm_eps)
        self.mlp: nn.Module = (
            MoE(config) if config.moe else SwiGLU(hidden=config.hidden, ffn=config.ffn_width)
        )
        self.dropout = dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


class Transformer(nn.Module):
    def __init__(
        self, config: ModelConfig, *, dropout: float = 0.0, activation_checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.config = config
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(Block(config, dropout=dropout) for _ in range(config.layers))
        self.norm = RMSNorm(config.hidden, eps=config.norm_eps)
        self.head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(
            head_dim=config.head_dim, seq_len=config.seq_len, theta=config.rope_theta
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled by depth.
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            std = 0.02
            if name.endswith(("out.weight", "down.weight")):
                std /= math.sqrt(2 * self.config.layers)
            nn.init.normal_(param, mean=0.0, std=std)

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        return cast(torch.Tensor, self.rope_cos), cast(torch.Tensor, self.rope_sin)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin = self.rope_tables()
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits

    def aux_loss(self) -> torch.Tensor:
        losses = [m.aux_loss for m in self.modules() if isinstance(m, Routed)]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def expert_load(self) -> torch.Tensor | None:
        """Mean fraction of tokens routed to each expert over the MoE layers (last pass)."""
        loads = [m.load for m in self.modules() if isinstance(m, Routed)]
        return torch.stack(loads).mean(0) if loads else None


def freeze(model: nn.Module, prefixes: list[str]) -> int:
    """Stop training parameters whose names start with a prefix; returns how many were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
