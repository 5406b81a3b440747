"""The in-memory checkpoint tier: each worker's snapshots in its own host memory, and a copy of
one neighbour's.

Every ``checkpoint.memoryIntervalSteps`` the writer serialises the training state into the
worker's tier, a directory on a tmpfs (``PRETRAIN_MEMORY_ROOT``: an ``emptyDir`` of medium
``Memory`` in a pod, ``/dev/shm`` locally) laid out exactly like the storage root, so a
snapshot survives its trainer process. Once every rank's files are in, on the writer thread
and the writer's own process group (never the training group: the two threads would race):

1. the ranks all-gather their file records, so each can write the same manifest;
2. each rank sends its files to the rank with its local rank on the next worker, and receives
   the previous worker's (a ring over workers: a lost worker's files survive on its neighbour);
3. each worker writes the manifest beside what it holds. "No manifest, no checkpoint" holds
   here as on storage: a snapshot whose exchange did not finish is never restored from.

A worker keeps its newest committed snapshot and the one being written (:data:`KEEP`): if a
worker is lost while its neighbour has not committed the newest, the neighbour still holds the
previous one whole. A storage save is a snapshot first; its files
are then copied from the tier to storage. :mod:`.recall` is the way back.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .layout import MANIFEST, STEP_GLOB, stage_dir, step_of
from .manifest import CheckpointError, FileRecord, Manifest, utc_now, write_manifest
from .transfer import Piece, exchange

KEEP = 1  # committed snapshots per worker, beside the one being written: two copies at most


@dataclass
class MemoryTier:
    """One rank's view of its worker's tier (local ranks of a worker share it)."""

    root: Path
    """This worker's tier for the job: mirrors the job's storage root."""
    storage_root: Path
    rank: int
    world_size: int
    local_world_size: int
    group: Any = None
    """The writer thread's own process group (None at world size 1)."""

    @classmethod
    def build(
        cls, root: Path, *, storage_root: Path, rank: int, world_size: int, local_world_size: int
    ) -> MemoryTier:
        """Collective on the training group when ``world_size > 1`` (it creates the writer's
        group): every rank calls it, in the same order relative to other collectives."""
        group = dist.new_group(backend="gloo") if world_size > 1 else None
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, storage_root, rank, world_size, max(1, local_world_size), group)

    @property
    def workers(self) -> int:
        return max(1, self.world_size // self.local_world_size)

    @property
    def neighbour(self) -> int | None:
        """The rank this rank's files are copied to: its local rank on the next worker."""
        if self.workers < 2:
            return None
        return (self.rank + self.local_world_size) % self.world_size

    @property
    def previous(self) -> int | None:
        """The rank whose files this rank holds a copy of."""
        if self.workers < 2:
            return None
        return (self.rank - self.local_world_size) % self.world_size

    def mirror(self, storage_path: Path) -> Path:
        """Where ``storage_path`` (under the storage root) lies in this tier."""
        return self.root / storage_path.relative_to(self.storage_root)

    def complete(
        self, directory: Path, *, records: list[FileRecord], fields: dict[str, Any]
    ) -> Manifest:
        """Writer thread, every rank, after its files of one snapshot are in ``directory``
        (in this tier): agree on the manifest, copy files around the ring, commit, prune."""
        mine = ([r.model_dump(mode="json", by_alias=True) for r in records], utc_now())
        gathered: list[Any] = [mine]
        if self.group is not None:
            gathered = [None] * self.world_size
            dist.all_gather_object(gathered, mine, group=self.group)
        shares = [[FileRecord.model_validate(r) for r in share] for share, _ in gathered]
        merged: dict[str, FileRecord] = {}
        for share in shares:
            for record in share:
                if merged.setdefault(record.path, record) != record:
                    raise CheckpointError(f"{directory}: ranks disagree about {record.path}")
        manifest = Manifest.model_validate(
            {**fields, "files": [merged[p] for p in sorted(merged)], "saved_at": gathered[0][1]}
        )
        neighbour, previous = self.neighbour, self.previous
        if neighbour is not None and previous is not None:
            exchange(
                send=[Piece(directory / r.path, r.size) for r in records],
                to=neighbour,
                receive=[Piece(directory / r.path, r.size) for r in shares[previous]],
                source=previous,
                group=self.group,
            )
        write_manifest(directory, manifest)
        self.prune(manifest.stage)
        return manifest

    def discard_after(self, *, stage: int, step: int | None) -> None:
        """At an attempt's start, on every rank (a barrier): the worker's first rank drops
        the stage's snapshots newer than the one restored from (``step``; None: all). They
        are held in part at best, and the attempt will write those steps again."""
        if self.rank % self.local_world_size == 0:
            for path in stage_dir(self.root, stage).glob(STEP_GLOB):
                found = step_of(path.name)
                if found is not None and (step is None or found > step):
                    shutil.rmtree(path, ignore_errors=True)
        if self.group is not None:
            dist.barrier()

    def prune(self, stage: int) -> None:
        """Keep the newest :data:`KEEP` committed snapshot(s) of ``stage``; drop older ones,
        uncommitted leftovers below the newest committed one, and every other stage's."""
        for other in self.root.glob("stage-*"):
            if other != stage_dir(self.root, stage):
                shutil.rmtree(other, ignore_errors=True)
        committed: list[tuple[int, Path]] = []
        uncommitted: list[tuple[int, Path]] = []
        for path in stage_dir(self.root, stage).glob(STEP_GLOB):
            step = step_of(path.name)
            if step is not None:
                (committed if (path / MANIFEST).is_file() else uncommitted).append((step, path))
        committed.sort(reverse=True)
        newest = committed[0][0] if committed else -1
        for _, path in committed[KEEP:] + [(s, p) for s, p in uncommitted if s < newest]:
            shutil.rmtree(path, ignore_errors=True)
