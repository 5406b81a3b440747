"""What one training run needs: data sources, stages, checkpoints (and the model).

:class:`RunConfig` is the file the trainer reads (rendered by the operator into a ConfigMap,
or written by the local backend). The PretrainJob spec extends it with how to run it on
Kubernetes, so the two can never disagree about a field.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from ..errors import PermanentError
from .base import (
    DNS_LABEL,
    SOURCE_NAME,
    BigCount,
    Checked,
    Count,
    Fraction,
    Problem,
    Spec,
    prefixed,
)
from .evaluation import Evaluation
from .model import ModelConfig
from .parallel import Parallelism
from .split import BatchSplit

Name = Annotated[str, Field(pattern=DNS_LABEL, max_length=63)]
SourceName = Annotated[str, Field(pattern=SOURCE_NAME, max_length=63)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class WorldSizeError(PermanentError, ValueError):
    """A stage cannot run at this world size: its global batch is not whole micro-batches, the
    world is empty, or it does not fit the stage's parallel layout. Permanent (validation
    refuses such a spec, so it means a spec or a launcher is wrong), and a ``ValueError`` for
    callers that catch that."""


MAX_EVAL_SOURCES = 16


class DataSource(Spec):
    """A named set of token shards."""

    name: SourceName
    """Name used by the stages' dataMix."""
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    """Directory or shard file; relative paths resolve against the run directory."""


class DataConfig(Spec):
    """Where the tokens come from."""

    sources: Annotated[list[DataSource], Field(min_length=1, max_length=256)]
    """Token sources, referred to by name from each stage's dataMix."""
    seed: Annotated[int, Field(ge=0, le=2**62)] = 0  # exact as a JSON double: the CRD can bound it
    """Seed of the mixture sampler; the same seed gives the same sample stream at any world size."""
    eval_sources: Annotated[list[DataSource], Field(max_length=MAX_EVAL_SOURCES)] = []
    """Held-out token sources, never trained on: every stage is evaluated on them (see
    stages[].eval) and reports its loss and perplexity on each (at most 16: a stage's report
    carries them in a pod's termination message, 4 KiB)."""

    def seed_for(self, stage: int) -> int:
        """The sampler seed of one stage: stages that read the same source do not replay its
        windows in the same order."""
        return (self.seed * 1_000_003 + stage) % 2**63


class Budget(Spec):
    """When a stage is done: after a number of optimizer steps or of training tokens."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.steps) != has(self.tokens)",
                    "message": "set exactly one of steps or tokens",
                }
            ]
        }
    )

    steps: BigCount | None = None
    """Optimizer steps in the stage."""
    tokens: BigCount | None = None
    """Training tokens in the stage (rounded up to whole steps)."""

    def problems(self) -> Iterator[Problem]:
        if (self.steps is None) == (self.tokens is None):
            yield Problem((), "set exactly one of steps or tokens")


class Optimizer(Spec):
    """AdamW hyper-parameters."""

    lr: Annotated[float, Field(gt=0, le=10)] = 3e-4
    """Peak learning rate."""
    betas: Annotated[tuple[Beta, Beta], Field(strict=False)] = (0.9, 0.95)
    """Adam beta1 and beta2."""
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.1
    """Decoupled weight decay."""
    eps: Annotated[float, Field(gt=0, lt=1)] = 1e-8
    """Adam epsilon."""


Decay = Literal["constant", "cosine", "linear", "step"]


class LRSchedule(Spec):
    """Linear warmup to the optimizer's lr, then a decay to finalLr by the end of the stage."""

    warmup_steps: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    """Steps of linear warmup from lr / warmupSteps to lr."""
    decay: Decay = "cosine"
    """Shape of the decay after warmup."""
    final_lr: Annotated[float, Field(ge=0, le=10)] | None = None
    """Learning rate at the end of the stage; defaults to lr / 10 (lr for constant)."""
    decay_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Cosine/linear: fraction of the post-warmup steps spent decaying; the lr holds at its peak
    before that (warmup-stable-decay when below 1)."""
    milestones: (
        Annotated[list[Annotated[float, Field(gt=0, lt=1)]], Field(max_length=64)] | None
    ) = None
    """Step decay: fractions of the post-warmup steps at which the lr drops by equal factors,
    reaching finalLr at the last one; defaults to [0.8, 0.9]."""

    def final_lr_for(self, lr: float) -> float:
        if self.decay == "constant":
            return lr
        return self.final_lr if self.final_lr is not None else lr / 10

    def lr_at(self, step: int, *, total_steps: int, lr: float) -> float:
        """Learning rate for optimizer step ``step`` (0-based) of a stage of ``total_steps``."""
        if step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return lr
        final = self.final_lr_for(lr)
        span = max(total_steps - self.warmup_steps, 1)
        done = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        if self.decay == "step":
            milestones = self.milestones if self.milestones is not None else [0.8, 0.9]
            passed = sum(1 for m in milestones if done >= m)
            return lr * (final / lr) ** (passed / len(milestones)) if passed else lr
        start = 1.0 - self.decay_fraction
        progress = min(max((done - start) / self.decay_fraction, 0.0), 1.0)
        if self.decay == "linear":
            return lr + (final - lr) * progress
        return final + (lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def problems(self, *, lr: float, total_steps: int) -> Iterator[Problem]:
        if self.decay == "constant" and self.final_lr is not None and self.final_lr != lr:
            yield Problem(("finalLr",), "has no effect with decay: constant; remove it")
        elif self.final_lr is not None and self.final_lr > lr:
            yield Problem(("finalLr",), f"({self.final_lr:g}) is above the peak lr ({lr:g})")
        if self.decay not in ("cosine", "linear") and self.decay_fraction != 1.0:
            yield Problem(
                ("decayFraction",), f"applies to cosine and linear decay, not {self.decay}"
            )
        if self.milestones is not None:
            if self.decay != "step":
                yield Problem(("milestones",), f"applies to step decay, not {self.decay}")
            elif not self.milestones:
                yield Problem(("milestones",), "needs at least one milestone")
            elif any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
                yield Problem(("milestones",), "must be strictly increasing")
        if self.warmup_steps >= total_steps and self.decay != "constant":
            yield Problem(
                ("warmupSteps",),
                f"({self.warmup_steps}) leaves no step to decay in a stage of {total_steps} steps",
            )


class WorkerRange(Spec):
    """Bounds on the number of workers (pods) for one stage."""

    min: Count
    """Fewest workers the stage runs with."""
    max: Count
    """Most workers the stage runs with."""


class Stage(Spec):
    """One phase of training with its own data mix, batch size and schedule."""

    name: Name
    """Stage name (a DNS label), unique in the job."""
    budget: Budget
    """When the stage ends."""
    data_mix: Annotated[
        dict[SourceName, Annotated[float, Field(ge=0)]], Field(min_length=1, max_length=256)
    ]
    """Source name -> relative weight (normalised; need not sum to 1)."""
    global_batch_size: Count
    """Sequences per optimizer step across all workers; constant whatever the world size."""
    micro_batch_size: Count = 1
    """Sequences per process per forward/backward pass."""
    seq_len: Count | None = None
    """Sequence length in this stage; defaults to model.seqLen and may not exceed it."""
    optimizer: Optimizer = Optimizer()
    """AdamW settings (a stage starts with a fresh optimizer)."""
    lr_schedule: LRSchedule = LRSchedule()
    """Learning-rate schedule over the stage."""
    grad_clip: Annotated[float, Field(ge=0, le=1e6)] = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dropout: Fraction = 0.0
    """Dropout probability in attention and feed-forward outputs."""
    label_smoothing: Fraction = 0.0
    """Label smoothing of the language-modelling loss."""
    freeze: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=1024)] = []
    """Module-name prefixes whose parameters are not trained (e.g. embed, layers.0)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Training precision (bf16 mixed precision with fp32 master weights, or full fp32)."""
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 1
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """Keep optimizer state in host memory (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters in host memory (ZeRO 3)."""
    activation_checkpointing: bool = False
    """Recompute block activations in the backward pass to save memory."""
    eval: Evaluation | None = None
    """Held-out evaluation of this stage; with data.evalSources and no eval, every source at
    the stage's end."""
    parallelism: Parallelism = Parallelism()
    """Tensor, pipeline and expert parallelism beside ZeRO data parallelism; a resize changes
    only the data-parallel degree (world size / (tensor x pipeline))."""
    workers: WorkerRange | None = None
    """Overrides the job's elastic worker bounds for this stage."""

    def seq_len_for(self, model: ModelConfig) -> int:
        return self.seq_len if self.seq_len is not None else model.seq_len

    def tokens_per_step(self, model: ModelConfig) -> int:
        return self.global_batch_size * self.seq_len_for(model)

    def total_steps(self, model: ModelConfig) -> int:
        if self.budget.steps is not None:
            return self.budget.steps
        tokens = self.budget.tokens or 0
        return max(1, -(-tokens // self.tokens_per_step(model)))

    def split(self, world_size: int) -> BatchSplit:
        """How each global batch splits into micro-batches over the data-parallel ranks of a
        world of ``world_size`` processes (:mod:`.split`): exact at any world size, uneven
        where it does not divide (never under pipeline parallelism, whose engine needs an
        even split). Raises :class:`WorldSizeError` when the batch is not whole micro-batches
        or the world does not fit the parallel layout."""
        if world_size < 1 or self.global_batch_size % self.micro_batch_size:
            raise WorldSizeError(
                f"stage {self.name!r}: globalBatchSize {self.global_batch_size} is not whole "
                f"micro-batches of {self.micro_batch_size} over world size {world_size}"
            )
        micro_batches = self.global_batch_size // self.micro_batch_size
        why = self.parallelism.world_problem(world_size, micro_batches=micro_batches)
        if why:
            raise WorldSizeError(f"stage {self.name!r}: {why}")
        return BatchSplit(micro_batches, self.parallelism.data_parallel(world_size))

    def problems(
        self, model: ModelConfig, sources: set[str], eval_sources: list[str]
    ) -> Iterator[Problem]:
        yield from prefixed(self.budget.problems(), "budget")
        if self.eval is not None:
            yield from prefixed(self.eval.problems(eval_sources), "eval")
        unknown = sorted(set(self.data_mix) - sources)
        for name in unknown:
            yield Problem(
                ("dataMix", name), f"unknown source; known sources: {', '.join(sorted(sources))}"
            )
        total = sum(self.data_mix.values())
        if not unknown and (total <= 0 or not math.isfinite(total)):
            yield Problem(
                ("dataMix",), f"weights must sum to a positive finite number, not {total}"
            )
        if self.global_batch_size % self.micro_batch_size:
            yield Problem(
                ("globalBatchSize",),
                f"({self.global_batch_size}) is not divisible by microBatchSize "
                f"({self.micro_batch_size})",
            )
        if self.seq_len is not None and self.seq_len > model.seq_len:
            yield Problem(("seqLen",), f"({self.seq_len}) exceeds model.seqLen ({model.seq_len})")
        if not any(self.budget.problems()):
            schedule = self.lr_schedule.problems(
                lr=self.optimizer.lr, total_steps=self.total_steps(model)
            )
            yield from prefixed(schedule, "lrSchedule")
        for i, prefix in enumerate(self.freeze):
            why = model.freeze_problem(prefix)
            if why:
                yield Problem(("freeze", i), why)
        if self.offload_optimizer and self.zero_stage == 0:
            yield Problem(("offloadOptimizer",), "needs zeroStage 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            yield Problem(("offloadParams",), "needs zeroStage 3")
        layout = self.parallelism.problems(model, zero_stage=self.zero_stage)
        yield from prefixed(layout, "parallelism")
        if self.workers is not None and self.workers.min > self.workers.max:
            yield Problem(
                ("workers", "min"), f"({self.workers.min}) exceeds workers.max ({self.workers.max})"
            )


class CheckpointConfig(Spec):
    """Where and how often checkpoints are written."""

    path: Annotated[str, Field(min_length=1, max_length=4096)] = "/checkpoints"
    """Root directory (a shared volume on Kubernetes); checkpoints go under <path>/<job>/."""
    interval_steps: Count = 100
    """Save to storage every this many optimizer steps (and always at the end of a stage)."""
    memory_interval_steps: Count | None = None
    """Snapshot to the in-memory tier (host memory of each worker, copied to a neighbour
    worker) every this many steps; at most ``intervalSteps``, default the smaller of 10 and
    ``intervalSteps``. A lost worker costs at most the steps since its last snapshot."""
    keep: Annotated[int, Field(ge=1, le=10000)] = 3
    """Recent checkpoints kept; each stage's final checkpoint is always kept as well."""
    preemption_grace_seconds: Annotated[float, Field(ge=0, le=3600)] = 25.0
    """After SIGTERM, save a checkpoint only if the last save took less than this."""
    preemption_min_age_seconds: Annotated[float, Field(ge=0, le=86400)] = 60.0
    """After SIGTERM, skip the save when the newest checkpoint is younger than this."""

    @property
    def memory_interval(self) -> int:
        """Steps between in-memory snapshots (a storage save is one too)."""
        if self.memory_interval_steps is None:
            return min(10, self.interval_steps)
        return self.memory_interval_steps


class TrainerOptions(Spec):
    """How the trainer processes behave, whatever the stage."""

    seed: Annotated[int, Field(ge=0, le=2**62)] = 0  # exact as a JSON double: the CRD can bound it
    """Seed of the model's initial weights (and of dropout)."""
    log_every_steps: Count = 10
    """Log a line (step, loss, lr, tokens/s) every this many steps."""
    spike_factor: Annotated[float, Field(ge=0, le=1e6)] = 10.0
    """Skip an optimizer step whose gradient norm exceeds this multiple of the recent median
    (non-finite norms are always skipped); 0 disables the spike check."""
    spike_window: Annotated[int, Field(ge=1, le=100000)] = 50
    """Accepted steps the median gradient norm is taken over."""
    step_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 600.0
    """/healthz fails when no step has finished for this long (hang detection)."""
    collective_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 300.0
    """Timeout of collective operations, so a silently lost peer fails the step instead of
    hanging forever."""


class RunConfig(Checked):
    """Everything the trainer needs to run any stage of a job."""

    model: ModelConfig
    """Model architecture, shared by all stages."""
    data: DataConfig
    """Token sources."""
    stages: Annotated[list[Stage], Field(min_length=1, max_length=64)]
    """Ordered stages; each starts from the previous stage's final weights."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpointing."""
    trainer: TrainerOptions = TrainerOptions()
    """Trainer process behaviour: seed, logging, stability guard, hang detection."""

    def problems(self) -> Iterator[Problem]:
        yield from prefixed(self.model.problems(), "model")
        names = Counter(s.name for s in self.data.sources)
        for i, source in enumerate(self.data.sources):
            if names[source.name] > 1:
                yield Problem(("data", "sources", i, "name"), f"duplicate source {source.name!r}")
        held_out = Counter(s.name for s in self.data.eval_sources)
        trained = {s.path: s.name for s in self.data.sources}
        for i, source in enumerate(self.data.eval_sources):
            if held_out[source.name] > 1:
                yield Problem(
                    ("data", "evalSources", i, "name"), f"duplicate eval source {source.name!r}"
                )
            if source.path in trained:
                yield Problem(
                    ("data", "evalSources", i, "path"),
                    f"is also training source {trained[source.path]!r}: held-out data must not "
                    "be trained on",
                )
        memory = self.checkpoint.memory_interval_steps
        if memory is not None and memory > self.checkpoint.interval_steps:
            yield Problem(
                ("checkpoint", "memoryIntervalSteps"),
                f"({memory}) exceeds checkpoint.intervalSteps ({self.checkpoint.interval_steps})",
            )
        first: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in first:
                yield Problem(
                    ("stages", i, "name"),
                    f"duplicate stage name {stage.name!r} (also stages[{first[stage.name]}])",
                )
            first.setdefault(stage.name, i)
            eval_names = [s.name for s in self.data.eval_sources]
            yield from prefixed(stage.problems(self.model, set(names), eval_names), "stages", i)

    def evaluation(self, stage_index: int) -> Evaluation | None:
        """How a stage is evaluated: its own ``eval``, else every eval source at its end;
        None without eval sources."""
        if not self.data.eval_sources:
            return None
        return self.stages[stage_index].eval or Evaluation()

    def stage_index(self, name: str) -> int:
        return [s.name for s in self.stages].index(name)
