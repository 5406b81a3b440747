"""How an attempt starts from a checkpoint: choosing it, and loading it in either of two ways.

Restore is decided before DeepSpeed is initialised, because loading a checkpoint written at
another world size needs DeepSpeed's universal format (``load_universal`` is an engine
setting). Rank 0 picks the newest complete checkpoint whose file sizes match its manifest
(:func:`choose`) and tells the others. Checksums are then computed on rank 0 *while* every rank
loads the same files (:func:`load_checkpoint`), so verification costs no second pass over the
disk; a mismatch quarantines the checkpoint (renamed, kept for inspection) and the caller
loads the previous one.

Stage hand-over does not go through DeepSpeed at all: a stage's final checkpoint also holds
the full fp32 weights (sharded by parameter across ranks), which the next stage loads into the
model before DeepSpeed partitions it (:func:`load_weights`). That works for every ZeRO stage
and world size, and the new stage starts with a fresh optimizer, schedule and data position,
as it should.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from ..errors import PermanentError
from ..logging import log0
from .catalog import clean_incomplete, newest_valid, verify
from .layout import (
    RANK_FILE_GLOB,
    RNG,
    UNIVERSAL,
    WEIGHTS,
    quarantined,
    rank_file,
    stage_dir,
)
from .manifest import Manifest

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine


@dataclass(frozen=True)
class RestorePlan:
    """The checkpoint an attempt starts from, chosen on rank 0 and broadcast to every rank."""

    directory: Path
    manifest: Manifest
    full: bool  # same stage: everything; previous stage: its final weights only
    universal: bool  # written at another world size: load through the universal format
    verify_seconds: float
    bytes_verified: int
    tier: str = "storage"
    """``storage``, or ``memory``: the workers' in-memory tiers (:mod:`.recall`), where each
    rank's ``directory`` is its own worker's copy."""
    checks: frozenset[str] | None = None
    """The files this rank checks as it loads them; None: rank 0 checks every file."""
    converts: bool | None = None
    """Whether this rank converts to the universal format; None: rank 0 does."""


@dataclass(frozen=True)
class Restored:
    """What an attempt started from, and what that cost (verification and conversion too)."""

    plan: RestorePlan
    seconds: float

    @property
    def path(self) -> Path:
        return self.plan.directory

    @property
    def manifest(self) -> Manifest:
        return self.plan.manifest


class CorruptCheckpoint(Exception):  # noqa: N818 - named for what it is
    """A checkpoint failed checksum verification while it was being loaded."""


class MissingCheckpointError(PermanentError):
    """A stage after the first has no final checkpoint of the previous stage to start from:
    that stage never finished, or its checkpoints were removed. A retry finds none either."""


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the value itself outside a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _has_zero_partitions(directory: Path) -> bool:
    return any(directory.glob("*zero_pp_rank_*"))


def choose(root: Path, *, stage: int, world_size: int) -> RestorePlan | None:
    """Rank 0: the checkpoint stage ``stage`` starts from at ``world_size``, or None for a
    fresh start. Its own newest complete checkpoint if any, else the previous stage's final
    one (:class:`MissingCheckpointError` when there is none). Leftovers of crashed saves are
    removed first."""
    root.mkdir(parents=True, exist_ok=True)
    for path in clean_incomplete(root):
        log0(f"removed incomplete checkpoint {path} (no manifest: its save never finished)")
    found = newest_valid(root, stage=stage, checksums=False, log=log0)
    full = found is not None
    if found is None and stage > 0:
        found = newest_valid(root, stage=stage - 1, final=True, log=log0)
        if found is None:
            raise MissingCheckpointError(
                f"stage {stage} starts from stage {stage - 1}'s final checkpoint, "
                f"but {stage_dir(root, stage - 1)} holds no valid final checkpoint"
            )
    if found is None:
        return None
    checkpoint, verification = found
    universal = (
        full
        and checkpoint.manifest.world_size != world_size
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


def load_weights(model: torch.nn.Module, plan: RestorePlan) -> float:
    """Start a stage from the previous stage's final fp32 weights; returns seconds."""
    started = time.perf_counter()
    state: dict[str, torch.Tensor] = {}
    for shard in sorted((plan.directory / WEIGHTS).glob(RANK_FILE_GLOB)):
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


def convert_to_universal(plan: RestorePlan, *, rank: int) -> float:
    """Rank 0 (or, from memory, each worker's first rank) converts a checkpoint written at
    another world size (once; the result is kept beside it); every rank waits.
    Returns seconds, part of the restore time."""
    started = time.perf_counter()
    target = plan.directory / UNIVERSAL
    converts = rank == 0 if plan.converts is None else plan.converts
    if converts and not target.is_dir():
        partial = plan.directory / (UNIVERSAL + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _ds_to_universal(plan.directory, partial)
        partial.rename(target)
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - started


def _ds_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's converter, in this process (its modules are already imported; a child
    interpreter would import them again), one worker: no process pool forked from a trainer."""
    from deepspeed.checkpoint import ds_to_universal

    arguments = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(arguments)
    except Exception as error:
        raise RuntimeError(
            f"converting {source} to the universal format failed: {error}\n"
            + chatter.getvalue()[-2000:]
        ) from error


def load_checkpoint(
    engine: DeepSpeedEngine,
    plan: RestorePlan,
    *,
    rank: int,
    extra_seconds: float = 0.0,
    by_parameter: Callable[[Path], None] | None = None,
) -> Restored:
    """Load everything from a checkpoint of this stage, verifying its checksums on rank 0 in
    parallel with the load; raises :class:`CorruptCheckpoint` (on every rank) after
    quarantining a checkpoint that fails. ``by_parameter``: the engine loads the weights
    only, and it puts the optimizer state back (a checkpoint of another world size that the
    universal format cannot carry)."""
    started = time.perf_counter()
    manifest = plan.manifest
    if plan.checks is not None:
        manifest = manifest.model_copy(
            update={"files": [f for f in manifest.files if f.path in plan.checks]}
        )
    with ThreadPoolExecutor(max_workers=1) as pool:
        checked = (
            pool.submit(verify, plan.directory, manifest, checksums=True)
            if rank == 0 or plan.checks is not None
            else None
        )
        if by_parameter is not None:
            path, _ = engine.load_checkpoint(
                str(plan.directory.parent), tag=plan.directory.name, load_optimizer_states=False
            )
            by_parameter(plan.directory)
        else:
            tag = plan.directory.name + (f"/{UNIVERSAL}" if plan.universal else "")
            path, _ = engine.load_checkpoint(str(plan.directory.parent), tag=tag)
        verification = checked.result() if checked is not None else None
    mine = None if verification is None else verification.problems
    problems = broadcast(mine) if plan.checks is None else _everyones(mine)
    if problems:
        if plan.tier == "memory":
            shutil.rmtree(plan.directory, ignore_errors=True)  # never trusted again
        elif rank == 0:
            _quarantine(plan.directory, problems)
        if dist.is_initialized():
            dist.barrier()
        raise CorruptCheckpoint(f"{plan.directory}: {'; '.join(problems)}")
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {plan.directory}")
    rng = plan.directory / rank_file(RNG, rank)
    if not plan.universal and rng.is_file():
        state = torch.load(rng, weights_only=False)
        torch.set_rng_state(state["cpu"])
        if torch.cuda.is_available() and state.get("cuda") is not None:
            torch.cuda.set_rng_state_all(state["cuda"])
    seconds = plan.verify_seconds + extra_seconds + time.perf_counter() - started
    return Restored(plan, seconds)


def _everyones(problems: list[str] | None) -> list[str]:
    """Every rank's problems, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problems or []
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    return [p for share in gathered for p in share or []]


def _quarantine(directory: Path, problems: list[str]) -> None:
    kept = quarantined(directory)
    shutil.rmtree(kept, ignore_errors=True)
    directory.rename(kept)
    log0(f"skipping {directory}: {'; '.join(problems)}; kept as {kept}")
