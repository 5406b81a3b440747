"""The checkpoint manager of one stage: what an attempt starts from, and when it saves.

Its life follows the trainer's set-up (docs/design.md, "Checkpoints"):

1. :meth:`CheckpointManager.prepare`, before ``deepspeed.initialize``: choose the checkpoint to
   restore (:mod:`.restore` explains how), load the previous stage's final weights into the
   model, or convert a checkpoint of another world size to the universal format and tell the
   DeepSpeed config to load that.
2. :meth:`~CheckpointManager.attach`: our background writer becomes the engine's checkpoint
   engine (restores read through it too).
3. :meth:`~CheckpointManager.load`: everything else a checkpoint holds goes back where it came
   from (the engine's state, RNG, the data position), falling back past corrupt checkpoints;
   the restore's cost goes to the metrics and the log.
4. :meth:`~CheckpointManager.save` after every step: the manager, not the training loop,
   decides whether a save is due (every ``intervalSteps``, and the stage's last step, whose
   checkpoint is final), as torchtitan's checkpointer does.

"engine" here is always DeepSpeed's; ours, the asynchronous writer, is the ``writer``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import Layout
from ..data.shards import DataError, open_source, tokenizer_file
from ..logging import log0
from .engine import AsyncCheckpointEngine, Saved
from .layout import RNG, TOKENIZER, WEIGHTS, checkpoint_dir, rank_file, stage_dir, step_name
from .manifest import config_hash
from .memory import MemoryTier
from .recall import directory_of, recall
from .restore import (
    CorruptCheckpoint,
    Restored,
    RestorePlan,
    broadcast,
    choose,
    convert_to_universal,
    load_checkpoint,
    load_weights,
)

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

    from ..config import RunConfig, Stage
    from ..data.loader import DataLoader
    from ..metrics import TrainerMetrics
    from ..optim import GuardedAdamW

__all__ = ["CheckpointManager", "CorruptCheckpoint", "RestorePlan", "Restored"]


def _expert_share(config: RunConfig, layout: Layout, rank: int) -> tuple[int, int, int]:
    """A rank's first expert, its place among the ranks that hold the same experts (its
    expert-data-parallel group) and their number."""
    assert config.model.moe is not None
    where = layout.coordinates(rank)
    local = config.model.moe.experts // layout.expert
    return where.expert * local, where.data // layout.expert, layout.data // layout.expert


def _tokenizer(config: RunConfig, stage: Stage) -> tuple[dict[str, Any], bytes | None]:
    """What the stage's data was tokenized with (the first source's shards, by name): its
    name and end-of-sequence id, and the tokenizers file ``prepare`` kept beside the shards
    when there is one. Problems with the data are the data loader's to report."""
    paths = {s.name: s.path for s in config.data.sources}
    try:
        shard = open_source(paths[min(stage.data_mix)]).shards[0]
    except (DataError, KeyError):
        return {"name": None, "eosId": None}, None
    file = tokenizer_file(shard)
    return {"name": shard.tokenizer, "eosId": shard.eos_id}, (
        file.read_bytes() if file is not None else None
    )


def recorded_facts(config: RunConfig, stage: Stage) -> dict[str, Any]:
    """What every manifest of a stage records beside the loss (``extra``), so that a
    checkpoint explains itself (``pretrain_trainer.export`` reads them): the model, the
    stage's layout, precision and frozen prefixes."""
    return {
        "model": config.model.model_dump(mode="json", by_alias=True),
        "parallelism": stage.parallelism.model_dump(mode="json", by_alias=True),
        "precision": stage.precision,
        "freeze": list(stage.freeze),
    }


@dataclass(frozen=True)
class SaveStarted:
    blocking: float
    """Seconds the call kept training waiting."""
    storage: bool
    """A storage save (else a memory snapshot only)."""


class CheckpointManager:
    def __init__(
        self,
        *,
        root: Path,
        job: str,
        stage: int,
        stage_name: str,
        rank: int,
        world_size: int,
        keep: int,
        interval: int,
        zero_stage: int,
        config_hash: str,
        memory: MemoryTier | None = None,
        memory_interval: int | None = None,
        share: tuple[int, int] | None = None,
        tensor_parallel: bool = False,
        experts: tuple[int, int, int] | None = None,
        layout: Layout | None = None,
        facts: Mapping[str, Any] | None = None,
        tokenizer: tuple[str, bytes] | None = None,
    ) -> None:
        self.root, self.job, self.stage, self.stage_name = root, job, stage, stage_name
        self.rank, self.world_size, self.keep, self.interval = rank, world_size, keep, interval
        self.zero_stage, self.config_hash = zero_stage, config_hash
        self.memory = memory
        self.memory_interval = memory_interval or interval
        # This rank's place among the ranks that hold the same part of the model whole (a
        # pipeline stage's, gathered over tensor groups), and their number: each saves a share
        # of that part's full weights (everything, without a layout).
        self.share = share if share is not None else (rank, world_size)
        self.tensor_parallel = tensor_parallel  # weights are split over tensor groups
        # With experts spread over ranks: this rank's first expert, and its place among the
        # ranks holding the same experts and their number.
        self.experts = experts
        self.layout = layout if layout is not None else Layout(1, 1, 1, world_size)
        # Recorded in every manifest's extra; the tokenizers file (name, bytes) goes into
        # every checkpoint, written by rank 0.
        self.facts = dict(facts or {})
        self.tokenizer = tokenizer
        self.writer: AsyncCheckpointEngine | None = None
        self._plan: RestorePlan | None = None
        self._prepared_seconds = 0.0  # spent by prepare(): weights loaded, or conversion

    @classmethod
    def for_stage(
        cls,
        config: RunConfig,
        *,
        stage_index: int,
        root: Path,
        job: str,
        rank: int,
        world_size: int,
        memory: MemoryTier | None = None,
    ) -> CheckpointManager:
        """The manager of one stage of ``config``, at ``world_size`` processes, with the
        worker's in-memory tier if it has one."""
        stage = config.stages[stage_index]
        layout = Layout.of(stage.parallelism, world_size)
        tokenizer, file = _tokenizer(config, stage)
        return cls(
            root=root,
            job=job,
            stage=stage_index,
            stage_name=stage.name,
            rank=rank,
            world_size=world_size,
            keep=config.checkpoint.keep,
            interval=config.checkpoint.interval_steps,
            zero_stage=stage.zero_stage,
            config_hash=config_hash(config),
            memory=memory,
            memory_interval=config.checkpoint.memory_interval,
            share=(
                layout.coordinates(rank).data * layout.tensor + layout.coordinates(rank).tensor,
                layout.data * layout.tensor,
            ),
            tensor_parallel=layout.tensor > 1,
            experts=None if layout.expert == 1 else _expert_share(config, layout, rank),
            layout=layout,
            facts={**recorded_facts(config, stage), "tokenizer": tokenizer},
            tokenizer=(tokenizer["name"], file) if file is not None else None,
        )

    @property
    def directory(self) -> Path:
        """Where this stage's checkpoints go."""
        return stage_dir(self.root, self.stage)

    # -- before deepspeed.initialize ---------------------------------------------------------
    def select(self) -> RestorePlan | None:
        """Which checkpoint this attempt starts from (decided on rank 0, shared with all):
        the newest snapshot the workers' memory tiers hold whole, when it is at least as new
        as the newest checkpoint on storage (its files brought to the ranks that read them),
        else storage's."""
        chosen = None
        if self.rank == 0:
            chosen = choose(self.root, stage=self.stage, world_size=self.world_size)
        chosen = broadcast(chosen)
        if self.memory is None:
            return chosen  # type: ignore[no-any-return]
        newest = chosen.manifest.step if chosen is not None and chosen.full else None
        recalled = recall(self.memory, stage=self.stage, at_least=newest)
        if recalled is not None and recalled.universal and self.experts is not None:
            recalled = None  # resharded parameter by parameter: from storage's files
        step = recalled.manifest.step if recalled is not None else newest
        self.memory.discard_after(stage=self.stage, step=step)
        if recalled is None:
            return chosen  # type: ignore[no-any-return]
        return RestorePlan(
            directory=directory_of(recalled, self.memory),
            manifest=recalled.manifest,
            full=True,
            universal=recalled.universal,
            verify_seconds=0.0,
            bytes_verified=0,
            tier="memory",
            checks=recalled.reads[self.rank],
            converts=self.rank in recalled.converters,
        )

    def prepare(self, model: torch.nn.Module, ds_config: dict[str, Any]) -> None:
        """Choose what to restore and do what must happen before DeepSpeed exists: a new
        stage's weights go into ``model``; a checkpoint of another world size is converted
        to the universal format, which ``ds_config`` is told to load."""
        self._plan = plan = self.select()
        if plan is None:
            return
        if not plan.full:
            self._prepared_seconds = plan.verify_seconds + load_weights(model, plan)
            log0(f"stage {self.stage_name} starts from the final weights of {plan.directory}")
        elif plan.universal and self.experts is not None:
            log0(
                f"{plan.directory} was written at world size {plan.manifest.world_size}; its "
                "optimizer state goes back parameter by parameter (experts spread over ranks)"
            )
        elif plan.universal:
            self._prepared_seconds = convert_to_universal(plan, rank=self.rank)
            ds_config["checkpoint"] = {"load_universal": True}
            log0(
                f"{plan.directory} was written at world size {plan.manifest.world_size}; "
                f"converted to the universal format in {self._prepared_seconds:.1f}s"
            )

    # -- after deepspeed.initialize ----------------------------------------------------------
    def attach(
        self, engine: DeepSpeedEngine, *, on_saved: Callable[[Saved], None] | None = None
    ) -> None:
        """Make our writer the engine's checkpoint engine (it loads, too: memory-mapped)."""
        self.writer = AsyncCheckpointEngine(
            root=self.root,
            rank=self.rank,
            world_size=self.world_size,
            keep=self.keep,
            on_saved=on_saved,
            memory=self.memory,
        )
        engine.checkpoint_engine = self.writer

    def load(
        self,
        engine: DeepSpeedEngine,
        *,
        optimizer: GuardedAdamW,
        data: DataLoader,
        metrics: TrainerMetrics,
    ) -> Restored | None:
        """Finish what :meth:`prepare` chose: for a checkpoint of this stage, load the engine,
        the RNG and the data position from it (or an older one, past corrupt ones). Returns
        what the attempt started from, None for a fresh start."""
        plan = self._plan
        if plan is None:
            return None
        if plan.full:
            restored = self._restore_newest(engine, plan)
            optimizer.repair_after_load()
            data.load_state_dict(restored.manifest.sampler)
        else:  # a new stage: the weights are in, the rest starts fresh
            restored = Restored(plan, self._prepared_seconds)
        self._report(restored, metrics)
        return restored

    def restore(
        self, engine: DeepSpeedEngine, plan: RestorePlan, *, extra_seconds: float = 0.0
    ) -> Restored:
        """Load ``plan``, a checkpoint of this stage, into ``engine`` (:func:`load_checkpoint`);
        with experts spread over ranks, one of another world size goes back parameter by
        parameter (``parallel.expert.restore_optimizer``)."""
        by_parameter = None
        if plan.universal and self.experts is not None:
            from ..parallel.expert import restore_optimizer

            layout = self.layout
            old_data = plan.manifest.world_size // (layout.tensor * layout.pipeline)

            def by_parameter(directory: Path) -> None:
                restore_optimizer(
                    engine, directory, old_data=old_data, layout=layout, rank=self.rank
                )

        return load_checkpoint(
            engine, plan, rank=self.rank, extra_seconds=extra_seconds, by_parameter=by_parameter
        )

    def _restore_newest(self, engine: DeepSpeedEngine, plan: RestorePlan) -> Restored:
        """Restore the newest checkpoint that loads and verifies, falling back past corrupt
        ones while the next candidate needs the same engine set-up (else restart cleanly)."""
        while True:
            try:
                return self.restore(engine, plan, extra_seconds=self._prepared_seconds)
            except CorruptCheckpoint:
                older = self.select()  # the corrupt one is quarantined: the next newest
                if older is None or not older.full or older.universal != plan.universal:
                    raise RuntimeError(
                        "the newest checkpoint was corrupt and the previous one needs a fresh "
                        "start; restarting"
                    ) from None
                plan = older

    def _report(self, restored: Restored, metrics: TrainerMetrics) -> None:
        plan, seconds = restored.plan, restored.seconds
        metrics.checkpoint_restore_seconds.set(seconds)
        if plan.full:  # a new stage starts from the last one's weights: no checkpoint of its own
            metrics.last_checkpoint_step.set(plan.manifest.step)
        saved = plan.manifest.saved_timestamp()
        if saved is not None:
            metrics.last_checkpoint_timestamp.set(saved)
        size = plan.manifest.total_bytes
        log0(
            f"restored {'everything' if plan.full else 'weights'} from {plan.directory} "
            f"({plan.tier}): "
            f"{size / 1e9:.3f} GB in {seconds:.2f}s "
            f"({size / 1e9 / max(seconds, 1e-9):.2f} GB/s; verified "
            f"{plan.bytes_verified / 1e9:.3f} GB in {plan.verify_seconds:.2f}s)"
        )

    def due(self, step: int, *, last_step: bool) -> bool:
        """Whether a storage save is due after ``step``: at every interval, and at the
        stage's end."""
        return last_step or step % self.interval == 0

    def snapshot_due(self, step: int) -> bool:
        """Whether a memory snapshot alone is due after ``step`` (with a tier)."""
        return self.memory is not None and step % self.memory_interval == 0

    def save(
        self,
        engine: DeepSpeedEngine,
        *,
        step: int,
        tokens: int,
        sampler: dict[str, Any],
        loss: float | None = None,
        last_step: bool = False,
        force: bool = False,
    ) -> SaveStarted | None:
        """Start saving a checkpoint of ``step`` if one is :meth:`due` (or ``force``), or a
        memory snapshot if only that is due; the last step's is the stage's final checkpoint.
        Returns how long the call blocked training and whether it goes to storage, or None
        when nothing was due. The rest of the blocking is :meth:`settle`'s."""
        storage = force or self.due(step, last_step=last_step)
        if not (storage or self.snapshot_due(step)):
            return None
        if self.writer is None:
            raise RuntimeError("attach() the writer before saving")
        started = time.perf_counter()
        self.writer.wait()  # one save at a time: the previous one must be complete
        self.writer.manifest_fields = dict(  # the Manifest's fields, by name
            job=self.job,
            stage=self.stage,
            stage_name=self.stage_name,
            step=step,
            tokens=tokens,
            world_size=self.world_size,
            zero_stage=self.zero_stage,
            config_hash=self.config_hash,
            final=last_step,
            sampler=sampler,
            extra={
                "loss": loss if loss is not None and math.isfinite(loss) else None,
                **self.facts,
            },
        )
        extra: dict[str, Any] = {
            rank_file(RNG, self.rank): {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
        }
        if last_step:
            extra[rank_file(WEIGHTS, self.rank)] = self._weights_share(engine)
        if self.tokenizer is not None and self.rank == 0:
            name, content = self.tokenizer
            extra[f"{TOKENIZER}/{name}"] = content
        self.writer.extra_files = extra
        self.writer.to_storage = storage
        engine.save_checkpoint(
            str(self.directory),
            tag=step_name(step),
            client_state={"step": step, "tokens": tokens, "sampler": sampler},
            save_latest=False,
        )
        return SaveStarted(blocking=time.perf_counter() - started, storage=storage)

    def path_of(self, step: int) -> Path:
        """The directory of this stage's checkpoint of ``step``."""
        return checkpoint_dir(self.root, stage=self.stage, step=step)

    def _weights_share(self, engine: DeepSpeedEngine) -> dict[str, torch.Tensor]:
        """This rank's share of the full fp32 weights under the model's parameter names
        (parameter i of the part this rank holds goes to the i % n-th of its n holders).
        Gathering is collective under ZeRO-3, so every rank walks every parameter."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters
        from deepspeed.utils import safe_get_full_fp32_param

        module = engine.module
        named = getattr(module, "model_parameters", module.named_parameters)()
        shares = {False: self.share}
        if self.experts is not None:
            from ..parallel.expert import model_name

            first, *expert_share = self.experts
            shares[True] = (expert_share[0], expert_share[1])
        seen = {False: 0, True: 0}
        share: dict[str, torch.Tensor] = {}
        for name, param in named:
            whole, expert = (name, False) if self.experts is None else model_name(name, first=first)
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None and hasattr(param, "ds_id"):  # a frozen ZeRO-3 partition
                with GatheredParameters([param]):
                    full = param.detach().float().clone()
            elif full is None:
                full = param.detach().float()
            if self.tensor_parallel:
                from ..parallel.tensor import gather_full

                full = gather_full(name, full)  # collective over the tensor group
            place, holders = shares[expert]
            if seen[expert] % holders == place:
                share[whole] = full.detach().to("cpu", copy=True)
            seen[expert] += 1
        return share

    def settle(self) -> float:
        """Before an optimizer step: wait until the last save's state is written (seconds)."""
        return self.writer.settle() if self.writer is not None else 0.0

    def wait(self) -> None:
        """Block until the last save is complete (before exiting)."""
        if self.writer is not None:
            self.writer.wait()
