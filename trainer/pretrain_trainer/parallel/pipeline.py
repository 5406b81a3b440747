"""Pipeline parallelism through DeepSpeed's own pipeline engine.

:func:`pipeline_module` turns the stage's :class:`~pretrain_trainer.model.Transformer` (built
whole, its weights initialised or loaded as for any layout) into a
:class:`deepspeed.pipe.PipelineModule` of the same modules: the embedding, one layer per block,
the final norm and output projection, with the language-modelling loss on the last stage.
Each process keeps only its pipeline stage's layers; ``deepspeed.initialize`` then returns a
``PipelineEngine``, whose ``train_batch`` runs a step's micro-batches through the pipeline
(1F1B), reduces gradients over the data-parallel group (ZeRO-1) and takes the optimizer step.

Three things DeepSpeed does not give as we need them:

- **The split.** ``partition_method`` takes no explicit list of layers per stage;
  ``parallelism.pipelineLayers`` sets the bounds itself (:class:`PipelinedTransformer`).
- **The rank layout.** DeepSpeed's default topology puts pipelines outermost; ours has data
  outermost (``config.parallel``: a worker holds whole replicas), given as the topology.
- **MoE's balance loss.** Blocks on earlier stages add to the loss the last stage computes:
  the activations between layers are ``(hidden, aux_sum)``, the running sum of the MoE
  layers' balance losses, whose gradient flows back through the pipeline like the hidden
  state's.

Tied embeddings are a ``TiedLayerSpec`` on the first and last stage: DeepSpeed all-reduces
their gradient between the two. The module's parameter names are the pipeline's own
(``3.attn.q.weight``); :meth:`PipelinedTransformer.model_parameters` gives them under the
model's names (``layers.2.attn.q.weight``), which is what the full fp32 weights at a stage's
end are saved as, so a stage hand-over crosses layouts.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from deepspeed.pipe import PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import ProcessTopology
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import Layout, ModelConfig, Stage
from ..model import IGNORE, RMSNorm, Routed, Transformer

Activations = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
TIED = "embed"


def _hidden(x: Activations) -> tuple[torch.Tensor, torch.Tensor | None]:
    return x if isinstance(x, tuple) else (x, None)


class _Embed(nn.Module):
    """The token embedding; with MoE it starts the running balance-loss sum (a zero that
    depends on the hidden state, so it carries a gradient even into a stage without MoE)."""

    def __init__(self, embed: nn.Embedding, *, moe: bool) -> None:
        super().__init__()
        self.embed, self.moe = embed, moe

    def forward(self, tokens: torch.Tensor) -> Activations:
        h: torch.Tensor = self.embed(tokens)
        return (h, (h.sum() * 0.0).reshape(1)) if self.moe else h


class _Block(nn.Module):
    """One transformer block; holds the block's own children, so names stay ``attn.q...``,
    and the RoPE tables as buffers (never sent between stages, never saved)."""

    def __init__(self, block: nn.Module, *, cos: torch.Tensor, sin: torch.Tensor) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Activations) -> Activations:
        h, aux = _hidden(x)
        h = self.block(h, self.rope_cos, self.rope_sin)
        mlp = self.block.mlp
        if aux is None or not isinstance(mlp, Routed):
            return h if aux is None else (h, aux)
        return h, aux + mlp.aux_loss.reshape(1)


class _Head(nn.Module):
    """The final norm and, untied, the output projection."""

    def __init__(self, norm: RMSNorm, head: nn.Linear | None) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, x: Activations) -> Activations:
        h, aux = _hidden(x)
        h = self.norm(h)
        if self.head is not None:
            h = self.head(h)
        return h if aux is None else (h, aux)


def _tied_head(embed: _Embed, x: Activations) -> Activations:
    h, aux = _hidden(x)
    logits = F.linear(h, embed.embed.weight)
    return logits if aux is None else (logits, aux)


def lm_pipeline_loss(
    outputs: Activations,
    targets: torch.Tensor,
    *,
    label_smoothing: float,
    aux_loss_coef: float,
    moe_layers: int,
) -> torch.Tensor:
    """The last stage's loss: cross-entropy, plus the mean MoE balance loss as the whole
    model computes it (``Transformer.aux_loss``)."""
    logits, aux = _hidden(outputs)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        label_smoothing=label_smoothing,
    )
    if aux is not None and aux_loss_coef:
        loss = loss + aux_loss_coef * aux.sum() / moe_layers
    return loss


def held_out_loss(outputs: Activations, targets: torch.Tensor) -> torch.Tensor:
    """The last stage's loss while evaluating: the summed cross-entropy of the tokens whose
    target is not ``IGNORE`` (padding rows), without the balance loss or label smoothing."""
    logits, _ = _hidden(outputs)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def topology(layout: Layout) -> ProcessTopology:
    """Our rank layout (data outermost, pipeline, then tensor innermost) in DeepSpeed's terms."""
    return ProcessTopology(axes=["data", "pipe"], dims=[layout.data, layout.pipeline])


class PipelinedTransformer(PipelineModule):  # type: ignore[misc]
    """The stage's share of a :class:`Transformer` for DeepSpeed's pipeline engine."""

    def __init__(
        self,
        layers: list[Any],
        *,
        bounds: list[int],
        names: list[tuple[str, str]],
        config: ModelConfig,
        **kwargs: Any,
    ) -> None:
        # Read by _partition_layers, which PipelineModule.__init__ calls.
        object.__setattr__(self, "_bounds", bounds)
        super().__init__(layers, **kwargs)
        self.model_config = config
        self._names = names  # layer index -> (its own prefix, the model's prefix) of names

    def _partition_layers(self, method: str = "uniform") -> None:
        del method  # the split is the layout's
        self.parts = list(self._bounds)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    def model_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This stage's parameters under the :class:`Transformer`'s names; the tied
        embedding once (the first stage's copy)."""
        for name, param in self.named_parameters():
            first, _, rest = name.partition(".")
            if first == "tied_modules":
                if self.stage_id == 0:
                    yield rest.split(".", 1)[1], param  # tied_modules.embed.embed.weight
                continue
            own, model = self._names[int(first)]
            yield model + rest.removeprefix(own), param

    def _moe(self) -> list[Routed]:
        return [m for m in self.modules() if isinstance(m, Routed)]

    def aux_loss(self) -> torch.Tensor:
        """Mean balance loss of this stage's MoE layers (the last pass)."""
        losses = [m.aux_loss for m in self._moe()]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def expert_load(self) -> torch.Tensor | None:
        """Mean expert load over this stage's MoE layers (the last pass)."""
        loads = [m.load for m in self._moe()]
        return torch.stack(loads).mean(0) if loads else None


def pipeline_module(model: Transformer, stage: Stage, layout: Layout) -> PipelinedTransformer:
    """The stage's pipeline of ``model``'s own modules (so loaded weights and frozen
    parameters carry over)."""
    config = model.config
    moe = config.moe is not None
    cos, sin = model.rope_tables()
    layers: list[Any] = []
    names: list[tuple[str, str]] = []
    if config.tie_embeddings:
        layers.append(
            TiedLayerSpec(TIED, _Embed, model.embed, moe=moe, tied_weight_attr=["embed.weight"])
        )
    else:
        layers.append(_Embed(model.embed, moe=moe))
    names.append(("", ""))  # embed.weight
    for i, block in enumerate(model.layers):
        layers.append(_Block(block, cos=cos, sin=sin))
        names.append(("block.", f"layers.{i}."))
    layers.append(_Head(model.norm, None if config.tie_embeddings else model.head))
    names.append(("", ""))  # norm.weight, head.weight
    if config.tie_embeddings:
        layers.append(
            TiedLayerSpec(
                TIED,
                _Embed,
                model.embed,
                moe=moe,
                forward_fn=_tied_head,
                tied_weight_attr=["embed.weight"],
            )
        )
        names.append(("", ""))
    split = stage.parallelism.layer_split(config.layers)
    bounds = [0]
    for blocks in split[:-1]:
        bounds.append(bounds[-1] + blocks + (1 if len(bounds) == 1 else 0))
    bounds.append(len(layers))
    moe_layers = config.layers if moe else 1
    coef = config.moe.aux_loss_coef if config.moe else 0.0
    return PipelinedTransformer(
        layers,
        bounds=bounds,
        names=names,
        config=config,
        topology=topology(layout),
        loss_fn=functools.partial(
            lm_pipeline_loss,
            label_smoothing=stage.label_smoothing,
            aux_loss_coef=coef,
            moe_layers=moe_layers,
        ),
        activation_checkpoint_interval=1 if stage.activation_checkpointing else 0,
        activation_checkpoint_func=functools.partial(checkpoint, use_reentrant=False),
    )
