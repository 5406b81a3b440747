"""One stage's training loop: ``train_step`` (one optimizer step over the rank's share of a
global batch) apart from ``Trainer.train`` (budget, metrics, logging, checkpoints, report)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import contract
from .ckpt.engine import Saved
from .ckpt.manager import CheckpointManager, stage_dir
from .ckpt.manifest import Manifest
from .config import RunConfig, Stage
from .data import MixtureSampler, TokenSource
from .logging import log0
from .metrics import Health, TrainerMetrics
from .model import Transformer
from .optim import GuardedAdamW


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        label_smoothing=label_smoothing,
    )


def micro_batches(
    sources: dict[str, TokenSource],
    samples: list[tuple[str, int]],
    *,
    seq_len: int,
    micro: int,
    device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's samples as (inputs, targets) micro-batches of ``micro`` sequences."""
    windows = np.stack([sources[name].window(offset, seq_len + 1) for name, offset in samples])
    tokens = torch.from_numpy(windows).to(device)
    return [
        (tokens[i : i + micro, :-1], tokens[i : i + micro, 1:])
        for i in range(0, len(samples), micro)
    ]


def train_step(
    engine: Any,
    optimizer: GuardedAdamW,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    label_smoothing: float,
    aux_loss_coef: float,
) -> float:
    """Forward/backward over every micro-batch and one optimizer step; returns this rank's
    mean loss. DeepSpeed accumulates gradients and steps at the last micro-batch."""
    optimizer.begin_step()
    total = 0.0
    for inputs, targets in batches:
        loss = lm_loss(engine(inputs), targets, label_smoothing=label_smoothing)
        if aux_loss_coef:
            loss = loss + aux_loss_coef * engine.module.aux_loss()
        engine.backward(loss)
        engine.step()
        total += float(loss.detach())
    return total / len(batches)


def reduce_step(loss: float, *, stop: bool) -> tuple[float, bool]:
    """The mean loss over all ranks, and whether any rank must stop."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loss, stop
    tensor = torch.tensor([loss, float(stop)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor[0]) / dist.get_world_size(), bool(tensor[1] > 0)


class Preempted(Exception):  # noqa: N818 - a signal, not an error
    """Training stopped on request (SIGTERM); the exit code is the retryable one."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted at step {step}")
        self.step = step


@dataclass
class Progress:
    step: int = 0
    tokens: int = 0
    loss: float = float("nan")


@dataclass
class Trainer:
    config: RunConfig
    stage_index: int
    engine: Any
    optimizer: GuardedAdamW
    sampler: MixtureSampler
    sources: dict[str, TokenSource]
    checkpoints: CheckpointManager
    metrics: TrainerMetrics
    health: Health
    rank: int
    world_size: int
    step_log: Path | None = None
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: Path | None = None
    stop_requested: bool = False  # set by the SIGTERM handler
    _saved_at: float = field(default_factory=time.monotonic)
    _last_save_seconds: float = 0.0
    _window_start: float = field(default_factory=time.perf_counter)
    _window_steps: int = 0
    # Lost time the next step record reports (goodput accounting by the control plane).
    unreported_restore: float = 0.0
    _unreported_blocking: float = 0.0

    @property
    def stage(self) -> Stage:
        return self.config.stages[self.stage_index]

    @property
    def total_steps(self) -> int:
        return self.stage.total_steps(self.config.model)

    def resume(self, manifest: Manifest, *, path: Path) -> None:
        self.last_checkpoint = path
        self.progress.step, self.progress.tokens = manifest.step, manifest.tokens
        loss = manifest.extra.get("loss")
        self.progress.loss = float(loss) if loss is not None else float("nan")
        self.sampler.load_state_dict(manifest.sampler)
        # Until the first step, the series say where training resumes, not zero.
        self.metrics.step.set(manifest.step)
        self.metrics.stage_tokens.set(manifest.tokens)
        if loss is not None:
            self.metrics.loss.set(float(loss))

    def save(self, *, final: bool = False) -> Path:
        blocking = self.checkpoints.save(
            self.engine,
            step=self.progress.step,
            tokens=self.progress.tokens,
            sampler=self.sampler.state_dict(),
            final=final,
            loss=self.progress.loss,
        )
        self.metrics.checkpoint_save_blocking_seconds.observe(blocking)
        self._unreported_blocking += blocking
        self._saved_at = time.monotonic()
        self.last_checkpoint = stage_dir(self.checkpoints.root, self.stage_index) / (
            f"step-{self.progress.step}"
        )
        log0(f"checkpoint step {self.progress.step}: training blocked {blocking:.3f}s")
        return self.last_checkpoint

    def on_saved(self, saved: Saved) -> None:
        """Called on rank 0's writer thread once a checkpoint is complete."""
        self._last_save_seconds = saved.seconds
        self.metrics.checkpoint_save_seconds.observe(saved.seconds)
        self.metrics.last_checkpoint_timestamp.set(time.time())
        self.metrics.last_checkpoint_step.set(saved.manifest.step)
        gigabytes = saved.manifest.total_bytes / 1e9
        log0(f"saved {saved.directory} ({gigabytes:.3f} GB) in {saved.seconds:.2f}s")

    def train(self) -> Path:
        """Train to the stage's budget; returns the final checkpoint's path. Raises
        :class:`Preempted` when asked to stop (after saving if worthwhile)."""
        total, interval = self.total_steps, self.config.checkpoint.interval_steps
        self.metrics.world_size.set(self.world_size)
        if self.progress.step >= total and self.last_checkpoint is not None:
            return self.last_checkpoint  # restored from this stage's final checkpoint
        while self.progress.step < total:
            self.train_one()
            if self.stop_requested:
                self.preempt()
            if self.progress.step % interval == 0 and self.progress.step < total:
                self.save()
        final = self.save(final=True)
        self.checkpoints.wait()
        return final

    def preempt(self) -> None:
        """Save on the way out when the newest checkpoint is old enough and a save fits in the
        grace period, then stop with the retryable exit code."""
        config, age = self.config.checkpoint, time.monotonic() - self._saved_at
        if age >= config.preemption_min_age_seconds and (
            self._last_save_seconds <= config.preemption_grace_seconds
        ):
            self.save()
            self.checkpoints.wait()
            log0(f"preempted: saved step {self.progress.step}, exiting to be restarted")
        else:
            log0(f"preempted: newest checkpoint is {age:.0f}s old, exiting without saving")
        raise Preempted(self.progress.step)

    def train_one(self) -> float:
        """One optimizer step over the next global batch, with metrics and logging; returns
        the step's loss (mean over the global batch)."""
        model_config, stage = self.config.model, self.stage
        tokens_per_step = stage.tokens_per_step(model_config)
        started, lr = time.perf_counter(), self.engine.get_lr()[0]  # this step's rate
        mine = self.sampler.rank_slice(self.sampler.next_global_batch(), self.rank, self.world_size)
        batches = micro_batches(
            self.sources,
            mine,
            seq_len=stage.seq_len_for(model_config),
            micro=stage.micro_batch_size,
            device=self.engine.device,
        )
        local = train_step(
            self.engine,
            self.optimizer,
            batches,
            label_smoothing=stage.label_smoothing,
            aux_loss_coef=model_config.moe.aux_loss_coef if model_config.moe else 0.0,
        )
        # One all-reduce carries the loss and whether any rank was asked to stop, so every
        # rank leaves (and saves) after the same step.
        loss, stop = reduce_step(local, stop=self.stop_requested)
        self.stop_requested = stop
        seconds = time.perf_counter() - started
        self.progress.step += 1
        self.progress.tokens += tokens_per_step
        self.progress.loss = loss
        self._record(loss=loss, lr=lr, seconds=seconds, tokens=tokens_per_step)
        self._log_step(loss=loss, lr=lr, seconds=seconds)
        self._window_steps += 1
        if (
            self.progress.step % self.config.trainer.log_every_steps == 0
            or self.progress.step == self.total_steps
        ):
            elapsed = time.perf_counter() - self._window_start
            skipped = self.optimizer.skipped_steps
            log0(
                f"stage {stage.name} step {self.progress.step}/{self.total_steps} "
                f"loss {loss:.4f} lr {lr:.3g} "
                f"tokens/s {self._window_steps * tokens_per_step / elapsed:,.0f} "
                f"grad norm {self.optimizer.last_grad_norm:.3g}"
                + (f" skipped {skipped}" if skipped else "")
            )
            self._window_start, self._window_steps = time.perf_counter(), 0
        return loss

    def _log_step(self, *, loss: float, lr: float, seconds: float) -> None:
        if self.step_log is None or self.rank != 0:
            return
        load = self.engine.module.expert_load()
        record = contract.StepRecord(
            stage=self.stage_index,
            step=self.progress.step,
            tokens=self.progress.tokens,
            loss=loss,
            lr=lr,
            grad_norm=self.optimizer.last_grad_norm,
            skipped=self.optimizer.last_skipped,
            seconds=seconds,
            time=time.time(),
            world_size=self.world_size,
            # The first step after a restore says what it cost, the first after a save what
            # that blocked (goodput accounting by the control plane).
            restore_seconds=self.unreported_restore or None,
            checkpoint_blocking=self._unreported_blocking or None,
            aux_loss=float(self.engine.module.aux_loss().detach()) if load is not None else None,
            expert_load=load.tolist() if load is not None else None,
        )
        self.unreported_restore = self._unreported_blocking = 0.0
        contract.append_step(self.step_log, record)

    def _record(self, *, loss: float, lr: float, seconds: float, tokens: int) -> None:
        m = self.metrics
        m.step.set(self.progress.step)
        m.loss.set(loss)
        m.tokens.inc(tokens)
        m.stage_tokens.set(self.progress.tokens)
        m.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        m.step_seconds.observe(seconds)
        m.learning_rate.set(lr)
        m.grad_norm.set(self.optimizer.last_grad_norm)
        if self.optimizer.last_skipped:
            m.skipped_steps.inc()
        m.last_step_timestamp.set(time.time())
        load = self.engine.module.expert_load()
        if load is not None:
            m.expert_load(load.tolist())
        self.health.progressed()


def build_sampler(
    config: RunConfig, stage_index: int, sources: dict[str, TokenSource]
) -> MixtureSampler:
    stage = config.stages[stage_index]
    return MixtureSampler(
        lengths={name: len(source) for name, source in sources.items()},
        mix=dict(stage.data_mix),
        seq_len=stage.seq_len_for(config.model),
        global_batch=stage.global_batch_size,
        seed=config.data.seed_for(stage_index),
    )


def build_model(config: RunConfig, stage: Stage) -> Transformer:
    torch.manual_seed(config.trainer.seed)
    return Transformer(
        config.model,
        dropout=stage.dropout,
        activation_checkpointing=stage.activation_checkpointing,
    )
