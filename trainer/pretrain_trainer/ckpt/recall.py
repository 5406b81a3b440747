"""Restoring from the in-memory tier: what the surviving workers hold, the newest snapshot they
hold whole between them, and the files brought to the ranks that read them.

Called by every rank of a new attempt before DeepSpeed is initialised (a collective on the
training group, which trains nothing yet):

1. each rank lists the committed snapshots of the stage in its worker's tier, and which of
   their files are there at the recorded size (:func:`inventory`); the lists are all-gathered;
2. rank 0 picks the newest snapshot whose files the workers hold between them, if it is at least
   as new as the newest checkpoint on storage (:func:`plan_recall`), and broadcasts the plan;
3. the files a worker's ranks will read but that worker lacks come from a rank that has them
   (:func:`fetch`): at the same world size a rank reads its own ZeRO partition and RNG state
   and the shared module states; at another world size each worker converts the whole
   snapshot to the universal format, so it gets every file.

The restore then loads from the worker's tier like a checkpoint on storage, each rank checking
the crc32 of the files it reads. Nothing held whole: storage, as before.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from .layout import MANIFEST, STEP_GLOB, file_rank, stage_dir, step_of
from .manifest import CheckpointError, Manifest, read_manifest
from .memory import MemoryTier
from .transfer import receive_file, send_file


@dataclass(frozen=True)
class Held:
    """A committed snapshot in one worker's tier, and which of its files are there."""

    step: int
    manifest: Manifest
    files: frozenset[str]


@dataclass(frozen=True)
class Holdings:
    """What one rank reports: its worker, and the snapshots that worker holds."""

    worker: str
    snapshots: tuple[Held, ...]


@dataclass(frozen=True)
class Transfer:
    path: str
    size: int
    source: int
    destination: int


@dataclass(frozen=True)
class Recall:
    """The snapshot an attempt restores from, and how its files reach their readers."""

    manifest: Manifest
    universal: bool
    transfers: tuple[Transfer, ...]
    reads: tuple[frozenset[str], ...]
    """Per rank: the files it reads back (and checks)."""
    converters: frozenset[int]
    """The ranks that convert to the universal format: each worker's first."""


def worker_id(tier: MemoryTier) -> str:
    """Ranks that share a tier share a worker: the host and the tier's path name it."""
    return f"{socket.gethostname()}:{tier.root.resolve()}"


def inventory(tier: MemoryTier, *, stage: int) -> Holdings:
    """The committed snapshots of ``stage`` in this worker's tier, newest first."""
    found = []
    for path in stage_dir(tier.root, stage).glob(STEP_GLOB):
        step = step_of(path.name)
        if step is None or not (path / MANIFEST).is_file():
            continue
        try:
            manifest = read_manifest(path)
        except CheckpointError:
            continue
        present = frozenset(
            f.path
            for f in manifest.files
            if (path / f.path).is_file() and (path / f.path).stat().st_size == f.size
        )
        found.append(Held(step, manifest, present))
    found.sort(key=lambda held: -held.step)
    return Holdings(worker_id(tier), tuple(found))


def _reads(manifest: Manifest, *, rank: int, universal: bool) -> frozenset[str]:
    paths = (f.path for f in manifest.files)
    if universal:
        return frozenset(paths)
    return frozenset(p for p in paths if file_rank(p) in (None, rank))


def plan_recall(
    holdings: list[Holdings], *, world_size: int, at_least: int | None
) -> Recall | None:
    """Rank 0: the newest snapshot the workers hold whole between them, no older than step
    ``at_least`` (the newest on storage), with the transfers that complete every reader's
    files; None when there is none. Pure: ``holdings[r]`` is what rank r reported."""
    steps = sorted({h.step for rank in holdings for h in rank.snapshots}, reverse=True)
    for step in steps:
        if at_least is not None and step < at_least:
            return None
        held = {
            r: next((h for h in report.snapshots if h.step == step), None)
            for r, report in enumerate(holdings)
        }
        manifest = next(h.manifest for h in held.values() if h is not None)
        have = {r: (h.files if h is not None else frozenset()) for r, h in held.items()}
        if set().union(*have.values()) != {f.path for f in manifest.files}:
            continue  # a lost worker's files went with it and its neighbour
        universal = manifest.world_size != world_size and any(
            "zero_pp_rank_" in f.path for f in manifest.files
        )
        reads = tuple(_reads(manifest, rank=r, universal=universal) for r in range(len(holdings)))
        sizes = {f.path: f.size for f in manifest.files}
        transfers: list[Transfer] = []
        ranks_of: dict[str, list[int]] = {}
        for r, report in enumerate(holdings):
            ranks_of.setdefault(report.worker, []).append(r)
        for path in sorted(sizes):
            sources = [r for r in range(len(holdings)) if path in have[r]]
            for ranks in sorted(ranks_of.values()):
                readers = [r for r in ranks if path in reads[r]]
                if readers and not any(path in have[r] for r in ranks):
                    transfers.append(Transfer(path, sizes[path], sources[0], readers[0]))
        converters = frozenset(min(ranks) for ranks in ranks_of.values())
        return Recall(manifest, universal, tuple(transfers), reads, converters)
    return None


def recall(tier: MemoryTier, *, stage: int, at_least: int | None) -> Recall | None:
    """Every rank: agree on a snapshot to restore from (:func:`plan_recall`) and :func:`fetch`
    its files. None: restore from storage (or start fresh)."""
    mine = inventory(tier, stage=stage)
    holdings: list[Holdings] = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        holdings = [mine] * dist.get_world_size()
        dist.all_gather_object(holdings, mine)
    chosen = [plan_recall(holdings, world_size=len(holdings), at_least=at_least)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(chosen, src=0)
    plan = chosen[0]
    if plan is not None:
        fetch(plan, tier=tier)
    return plan


def fetch(plan: Recall, *, tier: MemoryTier) -> None:
    """Carry out ``plan``'s transfers (every rank walks them in the same order)."""
    directory = directory_of(plan, tier)
    for t in plan.transfers:
        if tier.rank == t.source:
            send_file(directory / t.path, t.size, to=t.destination)
        elif tier.rank == t.destination:
            receive_file(directory / t.path, t.size, source=t.source)
    if plan.transfers and dist.is_initialized():
        dist.barrier()  # a worker's other ranks read what its first rank received


def directory_of(plan: Recall, tier: MemoryTier) -> Path:
    """The snapshot's directory in this rank's tier."""
    return stage_dir(tier.root, plan.manifest.stage) / f"step-{plan.manifest.step}"
