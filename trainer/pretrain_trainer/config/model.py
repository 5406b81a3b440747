"""The model family: a decoder-only transformer (RoPE, RMSNorm, SwiGLU), optionally MoE.

The parameter count is computed here, without torch, so the control plane can show model
sizes and throughput estimates; the trainer's module tree follows :data:`MODULE_ROOTS`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from pydantic import Field

from .base import Problem, Spec, prefixed

# Top-level module names of the trainer's model; `freeze` prefixes must start with one.
# `layers.<i>` addresses one block (`layers.<i>.attn`, `layers.<i>.mlp`, ...).
MODULE_ROOTS = ("embed", "layers", "norm", "head")


class MoE(Spec):
    """Mixture-of-experts feed-forward layers with top-k routing."""

    experts: Annotated[int, Field(ge=2, le=4096)]
    """Number of experts in each MoE feed-forward layer."""
    top_k: Annotated[int, Field(ge=1, le=64)] = 2
    """Experts each token is routed to."""
    aux_loss_coef: Annotated[float, Field(ge=0, le=1)] = 0.01
    """Weight of the load-balancing auxiliary loss added to the language-modelling loss."""

    def problems(self) -> Iterator[Problem]:
        if self.top_k > self.experts:
            yield Problem(("topK",), f"topK ({self.top_k}) exceeds experts ({self.experts})")


class ModelConfig(Spec):
    """A decoder-only transformer: RoPE positions, RMSNorm, SwiGLU feed-forward."""

    layers: Annotated[int, Field(gt=0, le=1024)]
    """Number of transformer blocks."""
    hidden: Annotated[int, Field(gt=0, le=131072)]
    """Model (residual stream) width."""
    heads: Annotated[int, Field(gt=0, le=1024)]
    """Attention heads; hidden / heads is the head dimension and must be even (RoPE)."""
    kv_heads: Annotated[int, Field(gt=0, le=1024)] | None = None
    """Key/value heads for grouped-query attention; defaults to heads (multi-head attention)."""
    ffn_hidden: Annotated[int, Field(gt=0, le=1048576)] | None = None
    """Feed-forward width; defaults to 8/3 x hidden rounded up to a multiple of 256 (as Llama)."""
    vocab_size: Annotated[int, Field(gt=0, le=2**24)]
    """Vocabulary size; token shards must hold ids below it."""
    seq_len: Annotated[int, Field(gt=0, le=2**20)]
    """Longest context the model is trained on; a stage may use a shorter one."""
    rope_theta: Annotated[float, Field(gt=0)] = 10000.0
    """RoPE base frequency."""
    norm_eps: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    moe: MoE | None = None
    """Replace every feed-forward layer with a mixture of experts."""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_head_count(self) -> int:
        return self.kv_heads if self.kv_heads is not None else self.heads

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        return -(-8 * self.hidden // (3 * 256)) * 256

    def num_params(self, *, active: bool = False) -> int:
        """Parameter count; with ``active``, only the experts a token is routed to count."""
        h, kv = self.hidden, self.kv_head_count * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        expert = 3 * h * self.ffn_width
        if self.moe is None:
            ffn = expert
        else:
            used = self.moe.top_k if active else self.moe.experts
            ffn = used * expert + h * self.moe.experts
        block = attention + ffn + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.layers * block + embeddings + h

    def problems(self) -> Iterator[Problem]:
        if self.hidden % self.heads:
            yield Problem(
                ("hidden",), f"hidden ({self.hidden}) is not divisible by heads ({self.heads})"
            )
        elif self.head_dim % 2:
            yield Problem(
                ("heads",),
                f"head dimension hidden / heads = {self.head_dim} must be even for RoPE",
            )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            yield Problem(
                ("kvHeads",), f"heads ({self.heads}) is not divisible by kvHeads ({self.kv_heads})"
            )
        if self.moe is not None:
            yield from prefixed(self.moe.problems(), "moe")

    def freeze_problem(self, prefix: str) -> str | None:
        """Why a `freeze` prefix names no module of this model, or None when it does."""
        parts = prefix.split(".")
        if parts[0] not in MODULE_ROOTS:
            return (
                f"{prefix!r} names no module; prefixes start with one of {', '.join(MODULE_ROOTS)}"
            )
        if (
            parts[0] == "layers"
            and len(parts) > 1
            and (not parts[1].isdigit() or int(parts[1]) >= self.layers)
        ):
            return f"{prefix!r}: layer index must be 0..{self.layers - 1}"
        if parts[0] == "head" and self.tie_embeddings:
            return "'head' is tied to 'embed' (tieEmbeddings); freeze 'embed' instead"
        return None
