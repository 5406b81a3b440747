"""One stage's training loop, shaped like torchtitan's trainer.

:func:`forward_backward_step` is the arithmetic of one optimizer step over a rank's
micro-batches; :meth:`Trainer.train_step` is one step with everything around it (the data,
the cross-rank loss, metrics, step records, logs); :meth:`Trainer.train` runs steps to the
stage's budget, hands each one to the checkpoint manager (which decides whether to save) and
stops cleanly when preempted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import contract
from .ckpt.engine import Saved
from .ckpt.layout import MANIFEST
from .ckpt.manager import CheckpointManager
from .ckpt.restore import Restored
from .config import BatchSplit, RunConfig, Stage
from .data.loader import DataLoader, MicroBatch
from .dsconfig import lockstep
from .evaluate import Evaluator, Ranks, perplexity
from .logging import log0
from .metrics import Health, TrainerMetrics
from .model import Transformer
from .optim import GuardedAdamW

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        label_smoothing=label_smoothing,
    )


def forward_backward_step(
    engine: DeepSpeedEngine,
    optimizer: GuardedAdamW,
    batches: list[MicroBatch],
    *,
    weight: float,
    padding: Sequence[MicroBatch] = (),
    label_smoothing: float,
    aux_loss_coef: float,
    before_update: Callable[[], object] = lambda: None,
) -> float:
    """Forward/backward over this rank's micro-batches and one optimizer step; returns the
    sum of their mean losses.

    Each micro-batch's loss is multiplied by ``weight`` (``BatchSplit.weight``: world size
    over micro-batches) before its backward, so the gradients DeepSpeed averages over the
    ranks are the mean over the whole global batch, however unevenly it splits. The
    ``padding`` micro-batches run first, weighted zero: dummy micro-steps that keep the
    collectives in step where every rank must run as many as the longest
    (``dsconfig.lockstep``), placed first so that the last forward is a real one (what MoE
    statistics read). The accumulation boundary, the last micro-step, is marked here:
    DeepSpeed's own count assumes an even split. ``before_update`` runs just before the
    optimizer changes the parameters and optimizer state (a save still writing them waits).
    """
    optimizer.begin_step()
    steps = [(b, 0.0) for b in padding] + [(b, weight) for b in batches]
    total = 0.0
    for i, ((inputs, targets), scale) in enumerate(steps):
        loss = lm_loss(engine(inputs), targets, label_smoothing=label_smoothing)
        if aux_loss_coef:
            loss = loss + aux_loss_coef * engine.module.aux_loss()
        boundary = i == len(steps) - 1
        engine.set_gradient_accumulation_boundary(boundary)
        engine.backward(loss * scale, scale_wrt_gas=False)
        if boundary:
            before_update()
        engine.step()
        if scale:
            total += float(loss.detach())
    return total


def pipeline_step(
    engine: DeepSpeedEngine, optimizer: GuardedAdamW, batches: list[MicroBatch]
) -> float:
    """One optimizer step of DeepSpeed's pipeline engine over this data-parallel rank's
    micro-batches (an even split: the engine runs a fixed count); returns the mean loss over
    the global batch, which the engine gives every rank. The first stage reads the inputs,
    the last the targets; the rest ignore them."""
    optimizer.begin_step()
    loss = engine.train_batch(data_iter=iter(batches))
    return float(loss)


def reduce_step(loss_sum: float, *, micro_batches: int, stop: bool) -> tuple[float, bool]:
    """The mean loss over the global batch from each rank's sum over its micro-batches, and
    whether any rank must stop."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return loss_sum / micro_batches, stop
    tensor = torch.tensor([loss_sum, float(stop)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor[0]) / micro_batches, bool(tensor[1] > 0)


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
    eval_loss: dict[str, float] | None = None
    """The newest held-out loss of each eval source."""


@dataclass
class Trainer:
    config: RunConfig
    stage_index: int
    engine: DeepSpeedEngine
    optimizer: GuardedAdamW
    data: DataLoader
    checkpoints: CheckpointManager
    metrics: TrainerMetrics
    health: Health
    rank: int
    world_size: int
    data_rank: int = 0
    """This rank's place in the data-parallel dimension: which share of the batch it reads
    (the rank itself without a parallel layout)."""
    pipelined: bool = False
    """Steps go through DeepSpeed's pipeline engine (:func:`pipeline_step`)."""
    evaluator: Evaluator | None = None
    """Measures the held-out loss when one is due (none without eval sources)."""
    step_log: Path | None = None
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: Path | None = None
    stop_requested: bool = False  # set by the SIGTERM handler
    _saved_at: float = field(default_factory=time.monotonic)
    _last_save_seconds: float = 0.0
    _window_start: float = field(default_factory=time.perf_counter)
    _window_steps: int = 0
    attempt: int = 0
    # What the next step record reports (goodput accounting by the control plane): the
    # attempt's start, the lost time, a checkpoint that became durable.
    startup: contract.Startup | None = None
    unreported_restore: float = 0.0
    _unreported_blocking: float = 0.0
    _unsettled: tuple[int, float] | None = None  # a save still writing: its step, blocking
    _unreported_checkpoint: int | None = None
    _unreported_eval: dict[str, float] | None = None
    _eval_seconds: float = 0.0
    _seconds_at: dict[int, float] = field(default_factory=dict)  # step seconds at each save
    _spent: contract.Usage | None = None  # what this process spent (``usage()``)
    _spending: threading.Lock = field(default_factory=threading.Lock)  # the writer thread too
    split: BatchSplit = field(init=False)
    """How each global batch splits over the ranks of this world (``config.split``)."""

    def __post_init__(self) -> None:
        self.split = self.stage.split(self.world_size)
        if self.pipelined:  # the engine takes the optimizer step: a save still writing waits
            self.optimizer.register_step_pre_hook(lambda *_: self.settle())

    @property
    def stage(self) -> Stage:
        return self.config.stages[self.stage_index]

    @property
    def total_steps(self) -> int:
        return self.stage.total_steps(self.config.model)

    def resume(self, restored: Restored | None) -> None:
        """Continue from what the attempt restored (``CheckpointManager.load``): the first step
        record reports what that cost, and a checkpoint of this stage gives the progress."""
        if restored is None:
            return
        self.unreported_restore = restored.seconds
        self._spend(restore_seconds=restored.seconds)
        if not restored.plan.full:
            return  # a new stage from the last one's weights: its progress starts at zero
        manifest = restored.manifest
        self.last_checkpoint = restored.path
        if restored.plan.tier == "memory":  # what reports and the next stage name: storage's
            stored = self.checkpoints.path_of(manifest.step)
            self.last_checkpoint = stored if (stored / MANIFEST).is_file() else None
        self.progress.step, self.progress.tokens = manifest.step, manifest.tokens
        loss = manifest.extra.get("loss")
        self.progress.loss = float(loss) if loss is not None else float("nan")
        # Until the first step, the series say where training resumes, not zero.
        self.metrics.step.set(manifest.step)
        self.metrics.stage_tokens.set(manifest.tokens)
        if loss is not None:
            self.metrics.loss.set(float(loss))

    def save(self, *, last_step: bool = False, force: bool = True) -> Path | None:
        """Save a checkpoint of the current step: now (``force``: on preemption, in
        benchmarks), or only when the checkpoint manager says one is due (after each step of
        :meth:`train`). Returns its directory, None when no save was due."""
        # Before the save: its writer may finish (and report it durable) before it returns.
        self._seconds_at[self.progress.step] = self.usage().step_seconds
        started = self.checkpoints.save(
            self.engine,
            step=self.progress.step,
            tokens=self.progress.tokens,
            sampler=self.data.state_dict(),
            loss=self.progress.loss,
            last_step=last_step,
            force=force,
        )
        if started is None or not started.storage:
            self._seconds_at.pop(self.progress.step, None)
        if started is None:
            return None
        self._block(started.blocking)
        self._unsettled = (self.progress.step, started.blocking)
        if not started.storage:
            return None
        self._saved_at = time.monotonic()
        self.last_checkpoint = self.checkpoints.path_of(self.progress.step)
        return self.last_checkpoint

    def _block(self, seconds: float) -> None:
        self._unreported_blocking += seconds
        self._spend(blocking_seconds=self.usage().blocking_seconds + seconds)

    def settle(self) -> None:
        """Before the optimizer step: the last save's state must be written out first; what
        that waits counts as the save's blocking (the call's own share already did)."""
        if self._unsettled is None:
            return
        (step, called), self._unsettled = self._unsettled, None
        waited = self.checkpoints.settle()
        self._block(waited)
        self.metrics.checkpoint_save_blocking_seconds.observe(called + waited)
        log0(f"checkpoint step {step}: training blocked {called + waited:.3f}s")

    def on_saved(self, saved: Saved) -> None:
        """Called on rank 0's writer thread once a checkpoint is complete."""
        self._last_save_seconds = saved.seconds
        self.metrics.checkpoint_save_seconds.observe(saved.seconds)
        self.metrics.last_checkpoint_timestamp.set(time.time())
        self.metrics.last_checkpoint_step.set(saved.manifest.step)
        step = saved.manifest.step
        seconds = self._seconds_at.get(step, 0.0)
        self.metrics.checkpoint_step_seconds.set(seconds)
        self._spend(
            checkpoint_step=step, checkpoint_step_seconds=seconds, checkpoint_time=time.time()
        )
        for older in [s for s in list(self._seconds_at) if s <= step]:
            self._seconds_at.pop(older, None)
        self._unreported_checkpoint = step
        gigabytes = saved.manifest.total_bytes / 1e9
        log0(f"saved {saved.directory} ({gigabytes:.3f} GB) in {saved.seconds:.2f}s")

    def train(self) -> Path:
        """Train to the stage's budget; returns the final checkpoint's path. Raises
        :class:`Preempted` when asked to stop (after saving if worthwhile)."""
        total = self.total_steps
        self.metrics.world_size.set(self.world_size)
        if self.progress.step >= total and self.last_checkpoint is not None:
            return self.last_checkpoint  # restored from this stage's final checkpoint
        if self.progress.step >= total:  # its final state, from memory only: storage gets it
            self.save(last_step=True, force=True)
        while self.progress.step < total:
            self.train_step()
            if self.stop_requested and self.progress.step < total:
                self.preempt()  # on the last step, a stop is better served by finishing
            self.save(last_step=self.progress.step == total, force=False)
        self.checkpoints.wait()
        self.settle()
        if self.last_checkpoint is None:  # the last step's save is always due
            raise RuntimeError(f"stage {self.stage.name} ended without a final checkpoint")
        return self.last_checkpoint

    def preempt(self) -> None:
        """Save on the way out when the newest checkpoint is old enough and a save fits in the
        grace period, then stop with the retryable exit code."""
        config, age = self.config.checkpoint, time.monotonic() - self._saved_at
        if age >= config.preemption_min_age_seconds and (
            self._last_save_seconds <= config.preemption_grace_seconds
        ):
            self.save()
            self.checkpoints.wait()
            self.settle()
            log0(f"preempted: saved step {self.progress.step}, exiting to be restarted")
        else:
            log0(f"preempted: newest checkpoint is {age:.0f}s old, exiting without saving")
        raise Preempted(self.progress.step)

    def train_step(self) -> float:
        """One optimizer step over the next global batch, with metrics and logging; returns
        the step's loss (mean over the global batch)."""
        model_config, stage = self.config.model, self.stage
        tokens_per_step = stage.tokens_per_step(model_config)
        started, lr = time.perf_counter(), self.engine.get_lr()[0]  # this step's rate
        batches = self.data.next_batch(
            rank=self.data_rank, split=self.split, device=self.engine.device
        )
        if self.pipelined:
            # Every rank holds the global mean: each contributes its share to the reduction.
            mean = pipeline_step(self.engine, self.optimizer, batches)
            local = mean * self.split.micro_batches / self.world_size
        else:
            local = forward_backward_step(
                self.engine,
                self.optimizer,
                batches,
                weight=self.split.weight(),
                padding=self._padding(batches),
                label_smoothing=stage.label_smoothing,
                aux_loss_coef=model_config.moe.aux_loss_coef if model_config.moe else 0.0,
                before_update=self.settle,
            )
            local /= self.world_size // self.split.ranks  # each tensor rank has the same sum
        # One all-reduce carries the loss and whether any rank was asked to stop, so every
        # rank leaves (and saves) after the same step.
        loss, stop = reduce_step(
            local, micro_batches=self.split.micro_batches, stop=self.stop_requested
        )
        self.stop_requested = stop
        seconds = time.perf_counter() - started
        self.progress.step += 1
        self.progress.tokens += tokens_per_step
        self.progress.loss = loss
        load = self.engine.module.expert_load()  # once: the metrics and the step record share it
        expert_load = load.tolist() if load is not None else None
        aux = float(self.engine.module.aux_loss().detach()) if load is not None else None
        held_out = self.evaluate()
        self._record(loss=loss, lr=lr, seconds=seconds, tokens=tokens_per_step, load=expert_load)
        self._log_step(loss=loss, lr=lr, seconds=seconds, load=expert_load, aux=aux)
        self._log_progress(loss=loss, lr=lr, tokens_per_step=tokens_per_step)
        if held_out is not None:
            log0(
                f"stage {stage.name} step {self.progress.step} eval "
                + ", ".join(
                    f"{k} loss {v:.4f} ppl {perplexity(v):.2f}" for k, v in held_out.items()
                )
                + f" ({self._eval_seconds:.2f}s)"
            )
        return loss

    def evaluate(self) -> dict[str, float] | None:
        """The held-out loss of each eval source if an evaluation is due after this step
        (collective: every rank decides alike), else None."""
        step = self.progress.step
        if self.evaluator is None or not self.evaluator.due(
            step, last_step=step == self.total_steps
        ):
            return None
        started = time.perf_counter()
        ranks = Ranks(
            data_rank=self.data_rank,
            data_ranks=self.split.ranks,
            replicas=self.world_size // self.split.ranks,  # a replica's tensor ranks
            pipelined=self.pipelined,
        )
        held_out = self.evaluator.run(self.engine, ranks=ranks)
        self._eval_seconds = time.perf_counter() - started
        self.progress.eval_loss = held_out
        self._unreported_eval = held_out
        for source, value in held_out.items():
            self.metrics.held_out(source, loss=value, perplexity=perplexity(value))
        self.metrics.eval_seconds.inc(self._eval_seconds)
        self._spend(eval_seconds=self.usage().eval_seconds + self._eval_seconds)
        return held_out

    def begin(self, startup: contract.Startup) -> None:
        """The attempt's start is over (``startup``): the first step record, the usage and
        the metrics say when it reached each point, and where training resumes."""
        self.startup = startup
        self.metrics.attempt.set(self.attempt)
        self.metrics.resumed_step.set(self.progress.step)
        for event, timestamp in startup.model_dump().items():
            self.metrics.startup(event, timestamp)
        self._spend(
            resumed_step=self.progress.step,
            step=self.progress.step,
            launcher_time=startup.launcher,
            group_time=startup.group,
            engine_time=startup.engine,
            restored_time=startup.restored,
        )

    def usage(self) -> contract.Usage:
        """What this process spent so far (a finished stage's report carries it)."""
        return self._spent or contract.Usage(attempt=self.attempt)

    def _spend(self, **fields: float | int | None) -> None:
        with self._spending:
            self._spent = self.usage().model_copy(update=fields)

    def _padding(self, batches: list[MicroBatch]) -> list[MicroBatch]:
        """The dummy micro-batches this rank runs before its own: up to the longest rank's
        count where the ZeRO stage needs lockstep, else only the one a rank without any
        micro-batch needs to reach the accumulation boundary at all."""
        steps = self.split.most if lockstep(self.stage) else 1
        missing = steps - len(batches)
        if missing <= 0:
            return []
        if batches:
            return [batches[0]] * missing
        shape = (self.stage.micro_batch_size, self.stage.seq_len_for(self.config.model))
        blank = torch.zeros(shape, dtype=torch.long, device=self.engine.device)
        return [(blank, blank)] * missing

    def _log_progress(self, *, loss: float, lr: float, tokens_per_step: int) -> None:
        """A log line every ``logEverySteps`` steps and at the last, with the throughput of
        the steps since the previous line."""
        self._window_steps += 1
        step, total = self.progress.step, self.total_steps
        if step % self.config.trainer.log_every_steps and step != total:
            return
        elapsed = time.perf_counter() - self._window_start
        skipped = self.optimizer.skipped_steps
        log0(
            f"stage {self.stage.name} step {step}/{total} "
            f"loss {loss:.4f} lr {lr:.3g} "
            f"tokens/s {self._window_steps * tokens_per_step / elapsed:,.0f} "
            f"grad norm {self.optimizer.last_grad_norm:.3g}"
            + (f" skipped {skipped}" if skipped else "")
        )
        self._window_start, self._window_steps = time.perf_counter(), 0

    def _log_step(
        self,
        *,
        loss: float,
        lr: float,
        seconds: float,
        load: list[float] | None,
        aux: float | None,
    ) -> None:
        if self.step_log is None or self.rank != 0:
            return
        # Taken before the record is built: the writer thread may report the next checkpoint.
        checkpointed, self._unreported_checkpoint = self._unreported_checkpoint, None
        record = contract.StepRecord(
            stage=self.stage_index,
            step=self.progress.step,
            attempt=self.attempt,
            tokens=self.progress.tokens,
            loss=loss,
            lr=lr,
            grad_norm=self.optimizer.last_grad_norm,
            skipped=self.optimizer.last_skipped,
            seconds=seconds,
            time=time.time(),
            world_size=self.world_size,
            micro_batches_most=self.split.most,
            micro_batches_fewest=self.split.fewest,
            # The first step after a restore says what it cost, the first after a save what
            # that blocked (goodput accounting by the control plane).
            restore_seconds=self.unreported_restore or None,
            checkpoint_blocking=self._unreported_blocking or None,
            checkpointed=checkpointed,
            startup=self.startup,
            aux_loss=aux,
            expert_load=load,
            eval_loss=self._unreported_eval,
            eval_seconds=self._eval_seconds if self._unreported_eval else None,
        )
        self._unreported_eval = None
        self.unreported_restore = self._unreported_blocking = 0.0
        self.startup = None
        contract.append_step(self.step_log, record)

    def _record(
        self, *, loss: float, lr: float, seconds: float, tokens: int, load: list[float] | None
    ) -> None:
        m = self.metrics
        m.step.set(self.progress.step)
        m.loss.set(loss)
        m.tokens.inc(tokens)
        m.stage_tokens.set(self.progress.tokens)
        m.tokens_per_second.set(tokens / seconds if seconds > 0 else 0.0)
        m.step_seconds.observe(seconds)
        spent, now = self.usage(), time.time()
        if not spent.steps:
            m.startup("first_step", now)
        # Only this thread changes these fields (the writer thread, the checkpoint's).
        self._spend(
            step=self.progress.step,
            steps=spent.steps + 1,
            step_seconds=spent.step_seconds + seconds,
            last_step_time=now,
            first_step_time=spent.first_step_time or now,
        )
        m.learning_rate.set(lr)
        m.grad_norm.set(self.optimizer.last_grad_norm)
        if self.optimizer.last_skipped:
            m.skipped_steps.inc()
        m.last_step_timestamp.set(time.time())
        if load is not None:
            m.expert_load(load)
        self.health.progressed()


def build_model(config: RunConfig, stage: Stage) -> Transformer:
    """The stage's model, initialised from the run's seed: every rank, and every attempt,
    starts from the same weights (a restore then overwrites them)."""
    torch.manual_seed(config.trainer.seed)
    return Transformer(
        config.model,
        dropout=stage.dropout,
        activation_checkpointing=stage.activation_checkpointing,
    )
