"""The checkpoint manager of one stage: what to restore, saving, stage hand-over, resharding.

Restore is decided before DeepSpeed is initialised, because loading a checkpoint written at
another world size needs DeepSpeed's universal format (``load_universal`` is an engine
setting). Rank 0 picks the newest complete checkpoint whose file sizes match its manifest and
tells the others. Checksums are then computed on rank 0 *while* every rank loads the same
files, so verification costs no second pass over the disk; a mismatch quarantines the
checkpoint (renamed, kept for inspection) and the caller loads the previous one.

Stage hand-over does not go through DeepSpeed at all: a stage's final checkpoint also holds
the full fp32 weights (sharded by parameter across ranks), which the next stage loads into the
model before DeepSpeed partitions it. That works for every ZeRO stage and world size, and the
new stage starts with a fresh optimizer, schedule and data position, as it should.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..logging import log0
from .catalog import clean_incomplete, newest_valid, verify
from .engine import AsyncCheckpointEngine, Saved
from .manifest import Manifest

WEIGHTS = "weights"
RNG = "rng"
UNIVERSAL = "universal"


def stage_dir(root: Path, stage: int) -> Path:
    return root / f"stage-{stage}"


@dataclass(frozen=True)
class RestorePlan:
    directory: Path
    manifest: Manifest
    full: bool  # same stage: everything; previous stage: its final weights only
    universal: bool  # written at another world size: load through the universal format
    verify_seconds: float
    bytes_verified: int


class CorruptCheckpoint(Exception):  # noqa: N818 - named for what it is
    """A checkpoint failed checksum verification while it was being loaded."""


@dataclass(frozen=True)
class Restored:
    plan: RestorePlan
    seconds: float

    @property
    def path(self) -> Path:
        return self.plan.directory

    @property
    def manifest(self) -> Manifest:
        return self.plan.manifest


def _has_zero_partitions(directory: Path) -> bool:
    return any(directory.glob("*zero_pp_rank_*"))


def _broadcast(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
        zero_stage: int,
        config_hash: str,
    ) -> None:
        self.root, self.job, self.stage, self.stage_name = root, job, stage, stage_name
        self.rank, self.world_size, self.keep = rank, world_size, keep
        self.zero_stage, self.config_hash = zero_stage, config_hash
        self.engine: AsyncCheckpointEngine | None = None
        self.last_saved: Saved | None = None

    # -- before deepspeed.initialize ---------------------------------------------------------
    def plan(self) -> RestorePlan | None:
        """Which checkpoint this attempt starts from (decided on rank 0, shared with all)."""
        plan = self._choose() if self.rank == 0 else None
        return _broadcast(plan)  # type: ignore[no-any-return]

    def _choose(self) -> RestorePlan | None:
        self.root.mkdir(parents=True, exist_ok=True)
        for path in clean_incomplete(self.root):
            log0(f"removed incomplete checkpoint {path} (no manifest: its save never finished)")
        found = newest_valid(self.root, stage=self.stage, checksums=False, log=log0)
        full = found is not None
        if found is None and self.stage > 0:
            found = newest_valid(self.root, stage=self.stage - 1, final=True, log=log0)
            if found is None:
                raise FileNotFoundError(
                    f"stage {self.stage} starts from stage {self.stage - 1}'s final checkpoint, "
                    f"but {stage_dir(self.root, self.stage - 1)} holds no valid final checkpoint"
                )
        if found is None:
            return None
        checkpoint, verification = found
        universal = (
            full
            and checkpoint.manifest.world_size != self.world_size
            and _has_zero_partitions(checkpoint.directory)
        )
        return RestorePlan(
            directory=checkpoint.directory,
            manifest=checkpoint.manifest,
            full=full,
            universal=universal,
            verify_seconds=verification.seconds,
            bytes_verified=verification.bytes_read,
        )

    def load_weights(self, model: torch.nn.Module, plan: RestorePlan) -> float:
        """Start a stage from the previous stage's final fp32 weights; returns seconds."""
        started = time.perf_counter()
        state: dict[str, torch.Tensor] = {}
        for shard in sorted((plan.directory / WEIGHTS).glob("rank-*.pt")):
            state.update(torch.load(shard, map_location="cpu", mmap=True, weights_only=True))
        _, unexpected = model.load_state_dict(state, strict=False)
        # Tied parameters appear once in named_parameters(): only those names must be present.
        missing = [name for name, _ in model.named_parameters() if name not in state]
        if missing or unexpected:
            raise RuntimeError(
                f"{plan.directory} does not match the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        return time.perf_counter() - started

    def convert_to_universal(self, plan: RestorePlan) -> float:
        """Rank 0 converts a checkpoint written at another world size (once; the result is
        kept beside it); every rank waits. Returns seconds, part of the restore time."""
        started = time.perf_counter()
        target = plan.directory / UNIVERSAL
        if self.rank == 0 and not target.is_dir():
            partial = plan.directory / (UNIVERSAL + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
            command += ["--input_folder", str(plan.directory), "--output_folder", str(partial)]
            result = subprocess.run(
                [*command, "--inject_missing_state"],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"converting {plan.directory} to the universal format failed:\n"
                    + result.stderr[-2000:]
                )
            partial.rename(target)
        if dist.is_initialized():
            dist.barrier()
        return time.perf_counter() - started

    # -- after deepspeed.initialize ----------------------------------------------------------
    def attach(self, engine: Any, *, on_saved: Any = None) -> None:
        self.engine = AsyncCheckpointEngine(
            root=self.root,
            rank=self.rank,
            world_size=self.world_size,
            keep=self.keep,
            on_saved=on_saved,
        )
        engine.checkpoint_engine = self.engine

    def restore(self, engine: Any, plan: RestorePlan, *, extra_seconds: float = 0.0) -> Restored:
        """Load everything from a checkpoint of this stage, verifying its checksums on rank 0
        in parallel with the load; raises :class:`CorruptCheckpoint` (on every rank) after
        quarantining a checkpoint that fails."""
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1) as pool:
            checked = (
                pool.submit(verify, plan.directory, plan.manifest, checksums=True)
                if self.rank == 0
                else None
            )
            tag = plan.directory.name + (f"/{UNIVERSAL}" if plan.universal else "")
            path, _ = engine.load_checkpoint(str(plan.directory.parent), tag=tag)
            verification = checked.result() if checked is not None else None
        problems = _broadcast(None if verification is None else verification.problems)
        if problems:
            if self.rank == 0:
                quarantined = plan.directory.with_name(f"{plan.directory.name}.corrupt")
                shutil.rmtree(quarantined, ignore_errors=True)
                plan.directory.rename(quarantined)
                log0(f"skipping {plan.directory}: {'; '.join(problems)}; kept as {quarantined}")
            if dist.is_initialized():
                dist.barrier()
            raise CorruptCheckpoint(f"{plan.directory}: {'; '.join(problems)}")
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {plan.directory}")
        rng = plan.directory / RNG / f"rank-{self.rank}.pt"
        if not plan.universal and rng.is_file():
            state = torch.load(rng, weights_only=False)
            torch.set_rng_state(state["cpu"])
            if torch.cuda.is_available() and state.get("cuda") is not None:
                torch.cuda.set_rng_state_all(state["cuda"])
        seconds = plan.verify_seconds + extra_seconds + time.perf_counter() - started
        return Restored(plan, seconds)

    def save(
        self,
        engine: Any,
        *,
        step: int,
        tokens: int,
        sampler: dict[str, Any],
        final: bool,
        loss: float | None = None,
    ) -> float:
        """Start saving a checkpoint; returns how long training was blocked (seconds)."""
        assert self.engine is not None, "attach() first"
        started = time.perf_counter()
        self.engine.wait()  # one save at a time: the previous one must be complete
        self.engine.manifest_fields = {
            "job": self.job,
            "stage": self.stage,
            "stageName": self.stage_name,
            "step": step,
            "tokens": tokens,
            "worldSize": self.world_size,
            "zeroStage": self.zero_stage,
            "configHash": self.config_hash,
            "final": final,
            "sampler": sampler,
            "extra": {"loss": loss if loss is not None and math.isfinite(loss) else None},
        }
        extra: dict[str, Any] = {
            f"{RNG}/rank-{self.rank}.pt": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }
        }
        if final:
            extra[f"{WEIGHTS}/rank-{self.rank}.pt"] = self._weights_share(engine)
        self.engine.extra_files = extra
        engine.save_checkpoint(
            str(stage_dir(self.root, self.stage)),
            tag=f"step-{step}",
            client_state={"step": step, "tokens": tokens, "sampler": sampler},
            save_latest=False,
        )
        return time.perf_counter() - started

    def _weights_share(self, engine: Any) -> dict[str, torch.Tensor]:
        """This rank's share of the full fp32 weights (parameter i goes to rank i % world).
        Gathering is collective under ZeRO-3, so every rank walks every parameter."""
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters
        from deepspeed.utils import safe_get_full_fp32_param

        share: dict[str, torch.Tensor] = {}
        for i, (name, param) in enumerate(engine.module.named_parameters()):
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None and hasattr(param, "ds_id"):  # a frozen ZeRO-3 partition
                with GatheredParameters([param]):
                    full = param.detach().float().clone()
            elif full is None:
                full = param.detach().float()
            if i % self.world_size == self.rank:
                share[name] = full.detach().to("cpu", copy=True)
        return share

    def wait(self) -> None:
        """Block until the last save is complete (before exiting)."""
        if self.engine is not None:
            self.engine.wait()
