"""A stage's optimizer and learning-rate schedule: :func:`build_optimizer`.

The optimizer is AdamW with a stability guard: a step whose gradient norm is not finite, or
spikes far above the recent median, is skipped (the update is not applied) and counted.
DeepSpeed skips steps only on fp16 overflow. Its ZeRO/bf16 optimizers call this optimizer's
``step`` once per parameter group after computing the global norm, so the decision is made
once per training step (:meth:`GuardedAdamW.begin_step` resets it) from a norm supplied by
``norm_source``; without such a wrapper the optimizer computes the norm and clips itself.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from .config import Stage, TrainerOptions
from .dsconfig import owns_clipping

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

SchedulerFactory = Callable[[torch.optim.Optimizer], LambdaLR]
"""What ``deepspeed.initialize(lr_scheduler=...)`` takes: it wraps the optimizer first, then
hands the wrapper to the factory."""


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices decay, vectors (norm gains) do not. With
    experts spread over ranks (``parallel.expert``), each group splits again into the
    experts' and the rest, as DeepSpeed's ZeRO requires (it reduces them over other ranks)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [
        {"name": "decay", "params": [p for p in trainable if p.dim() >= 2]},
        {"name": "no-decay", "params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    if any(getattr(p, "allreduce", True) is False for p in trainable):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


class GuardedAdamW(torch.optim.AdamW):
    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        spike_factor: float,
        spike_window: int,
        clip: float = 0.0,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._group_settings = [
            {k: group[k] for k in ("weight_decay", "betas", "eps")} for group in self.param_groups
        ]
        self.spike_factor = spike_factor
        self.clip = clip
        self.norm_source: Callable[[], float | None] | None = None
        self.history: deque[float] = deque(maxlen=spike_window)
        self.skipped_steps = 0
        self.last_grad_norm = float("nan")
        self.last_skipped = False
        self._decided = False

    def repair_after_load(self) -> None:
        """Undo two side effects of DeepSpeed's ZeRO-3 universal-checkpoint load.

        It copies the first group's hyper-parameters onto every group (the norm gains would
        start to decay), and it gives every parameter state the *same* ``step`` tensor, which
        AdamW increments in place once per group: Adam's bias correction would then run ahead.
        Harmless after any other load."""
        for group, settings in zip(self.param_groups, self._group_settings, strict=False):
            group.update(settings)
        for state in self.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()

    def read_norm_from(self, engine: DeepSpeedEngine) -> None:
        """Take each step's global gradient norm from DeepSpeed's ZeRO/bf16 optimizer, which
        computes it before clipping (a rank's own gradients are only its partition)."""
        self.norm_source = lambda: getattr(engine.optimizer, "_global_grad_norm", None)

    def begin_step(self) -> None:
        """Call before each training step's (boundary) engine.step()."""
        self._decided = False

    def _local_norm(self) -> float:
        squares = [
            p.grad.detach().float().pow(2).sum()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0

    def _decide(self) -> None:
        norm = self.norm_source() if self.norm_source is not None else None
        norm = self._local_norm() if norm is None else float(norm)
        median = statistics.median(self.history) if len(self.history) >= 5 else None
        spike = self.spike_factor > 0 and median is not None and norm > self.spike_factor * median
        self.last_grad_norm, self.last_skipped = norm, not math.isfinite(norm) or spike
        if self.last_skipped:
            self.skipped_steps += 1
        else:
            self.history.append(norm)
        self._decided = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if not self._decided:
            self._decide()
        if self.last_skipped:
            return None
        if self.clip > 0 and self.last_grad_norm > self.clip:
            scale = self.clip / (self.last_grad_norm + 1e-6)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return super().step(closure)  # type: ignore[no-any-return]


def build_optimizer(
    model: torch.nn.Module, *, stage: Stage, trainer_config: TrainerOptions, total_steps: int
) -> tuple[GuardedAdamW, SchedulerFactory]:
    """A stage's fresh optimizer over the model's trainable parameters (freeze first), and
    the factory of its schedule: warmup and decay over ``total_steps``, as a multiple of the
    peak rate (the optimizer's ``lr``). The optimizer clips only where DeepSpeed does not."""
    optimizer = GuardedAdamW(
        param_groups(model),
        lr=stage.optimizer.lr,
        betas=stage.optimizer.betas,
        eps=stage.optimizer.eps,
        weight_decay=stage.optimizer.weight_decay,
        spike_factor=trainer_config.spike_factor,
        spike_window=trainer_config.spike_window,
        clip=stage.grad_clip if owns_clipping(stage) else 0.0,
    )
    schedule, peak = stage.lr_schedule, stage.optimizer.lr

    def scheduler(wrapped: torch.optim.Optimizer) -> LambdaLR:
        return LambdaLR(
            wrapped, lambda step: schedule.lr_at(step, total_steps=total_steps, lr=peak) / peak
        )

    return optimizer, scheduler
