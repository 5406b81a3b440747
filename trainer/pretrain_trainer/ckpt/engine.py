"""A DeepSpeed checkpoint engine under which training barely waits for a save.

DeepSpeed hands every state dict it saves (module, ZeRO partitions) to ``save``; this engine
keeps the tensors by reference (other leaves are copied) and returns at once. One background
thread per process serialises them, hashing the bytes as they are written, while training runs
the next step's forward and backward: parameters and optimizer state change only at the
optimizer step, and the trainer calls :meth:`AsyncCheckpointEngine.settle` before it, which
waits for whatever is still unwritten. So there are no host buffers to allocate or copy into,
the first save included.

The files go to the worker's in-memory tier when there is one (:mod:`.memory`: the snapshot
is committed there and copied to a neighbour) and, when the save is a storage save, are then
copied to storage; without a tier they go to storage directly. ``commit`` queues the storage
completion: the process writes its rank marker; rank 0 waits for every marker, writes the
manifest (the checkpoint now exists), moves ``latest`` and applies retention. No collective
of the training group runs on the background thread: it would race the training thread's
collectives (the tier uses a group of its own). The next save waits for the previous one.

Loading memory-maps each file (``torch.load(mmap=True)``), so restoring costs about a read of
the bytes plus one copy into the engine's tensors.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import queue
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import (
    CheckpointCommitInfo,
    CheckpointEngine,
)

from ..fsio import copy_durable
from .catalog import prune
from .hashing import HashingFile
from .manifest import FileRecord, Manifest, utc_now, write_manifest
from .memory import MemoryTier
from .store import (
    StorageError,
    collect_rank_markers,
    remove_rank_markers,
    set_latest,
    storage_error,
    write_rank_marker,
)


def freeze(value: Any) -> Any:
    """The state DeepSpeed hands over, made safe to write later: tensors by reference
    (detached; parameters and optimizer state change only at the next optimizer step, which
    first waits for the write: :meth:`AsyncCheckpointEngine.settle`), every other leaf
    copied now (schedulers and counters change in between)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, torch.Size):  # a tuple, but readers call .numel() on it (zero_to_fp32)
        return value
    if isinstance(value, OrderedDict):
        return OrderedDict((k, freeze(v)) for k, v in value.items())
    if isinstance(value, dict):
        return {k: freeze(v) for k, v in value.items()}
    if isinstance(value, list):
        return [freeze(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(freeze(v) for v in value)
    try:
        return copy.deepcopy(value)
    except Exception:  # an opaque object DeepSpeed stores by reference; it is not mutated
        return value


@dataclass(frozen=True)
class Saved:
    """A checkpoint that became complete (reported on rank 0 only)."""

    directory: Path
    manifest: Manifest
    seconds: float


@dataclass
class _Pending:
    directory: Path
    """On storage."""
    first: Path
    """Where the files are written first: the memory tier's copy, else ``directory``."""
    started: float
    records: list[FileRecord]
    storage: bool
    """Whether the save goes on to storage (else it is a memory snapshot only)."""


@dataclass(frozen=True)
class _Always:
    """A queued job that runs even after a failed one (it releases a waiter)."""

    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()


class AsyncCheckpointEngine(CheckpointEngine):  # type: ignore[misc]
    def __init__(
        self,
        *,
        root: Path,
        rank: int,
        world_size: int,
        keep: int,
        marker_timeout: float = 600.0,
        on_saved: Callable[[Saved], None] | None = None,
        memory: MemoryTier | None = None,
    ) -> None:
        super().__init__(config_params=None)
        self.name = "pretrain-async"
        self.root, self.rank, self.world_size, self.keep = root, rank, world_size, keep
        self.marker_timeout = marker_timeout
        self.on_saved, self.memory = on_saved, memory
        # Set before each save by the manager:
        self.manifest_fields: dict[str, Any] = {}
        # Relative path -> object, saved by this rank (torch.save; ``bytes`` are written raw).
        self.extra_files: dict[str, Any] = {}
        self.to_storage = True  # False: a memory snapshot only
        self._pending: _Pending | None = None
        self._settled = threading.Event()  # the last save no longer needs the live tensors
        self._settled.set()
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue()
        self._error: BaseException | None = None
        self._failed: Path | None = None  # the checkpoint whose write failed
        threading.Thread(target=self._work, name="checkpoint-writer", daemon=True).start()

    # -- DeepSpeed's interface -------------------------------------------------------------
    def create(self, info: CheckpointCommitInfo) -> None:
        self.wait()
        directory = Path(info.save_dir) / info.tag
        first = self.memory.mirror(directory) if self.memory is not None else directory
        storage = self.to_storage or self.memory is None
        self._pending = _Pending(directory, first, time.perf_counter(), [], storage)
        self._settled.clear()
        for relative, value in self.extra_files.items():
            self.save(value, str(directory / relative))

    def save(self, state_dict: Any, path: str) -> None:
        pending = self._pending
        if pending is None:
            raise RuntimeError("save() outside create()/commit()")
        target = pending.first / Path(path).relative_to(pending.directory)
        frozen = freeze(state_dict)
        self._queue.put(lambda: self._write(pending, target, frozen))

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, mmap=True, weights_only=False)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        pending, fields = self._pending, dict(self.manifest_fields)
        if pending is None:
            raise RuntimeError("commit() without create()")
        self._pending = None
        if self.memory is not None:
            self._queue.put(lambda: self._commit_memory(pending, fields))
        self._queue.put(_Always(self._settled.set))
        self._queue.put(lambda: self._complete(pending, fields))
        return True

    # -- ours --------------------------------------------------------------------------------
    def settle(self) -> float:
        """Block until the state handed over at the last save is written out of the tensors
        training is about to change and, with a memory tier, the snapshot is committed there
        and on the neighbour (call before every optimizer step), so a lost worker never costs
        more than the steps since the last snapshot; returns the seconds waited. The storage
        part of the save goes on."""
        if self._settled.is_set():
            return 0.0
        started = time.perf_counter()
        self._settled.wait()
        return time.perf_counter() - started

    def wait(self) -> None:
        """Block until every queued write and completion has finished; re-raise a failure.

        A checkpoint whose write failed never gets its manifest, so it is never trusted; its
        partial files are removed here (they may be what filled the disk)."""
        self._queue.join()
        if self._error is None:
            return
        error, failed = self._error, self._failed
        self._error = self._failed = None
        if failed is not None:
            shutil.rmtree(failed, ignore_errors=True)
        refused = storage_error(error)
        if refused is not None:
            raise StorageError(
                f"cannot write checkpoint {failed}: {refused.strerror or refused} "
                f"({errno.errorcode.get(refused.errno or 0, '?')}); the checkpoints before it "
                f"are intact"
            ) from error
        raise RuntimeError(f"background checkpoint write failed: {error}") from error

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if self._error is None or isinstance(job, _Always):
                    job()
            except BaseException as error:  # reported by the next wait()
                self._error = error
            finally:
                self._queue.task_done()

    def _write(self, pending: _Pending, target: Path, value: Any) -> None:
        self._failed = pending.first  # until the write below has succeeded
        target.parent.mkdir(parents=True, exist_ok=True)
        with HashingFile(target) as out:
            if isinstance(value, bytes):  # a file as it is (the tokenizer), not a pickle
                out.write(value)
            else:
                torch.save(value, cast(IO[bytes], out))
        pending.records.append(out.record(relative_to=pending.first))
        self._failed = None

    def _commit_memory(self, pending: _Pending, fields: dict[str, Any]) -> None:
        assert self.memory is not None
        self._failed = pending.first  # until the manifest makes it a snapshot
        self.memory.complete(pending.first, records=pending.records, fields=fields)
        self._failed = None

    def _complete(self, pending: _Pending, fields: dict[str, Any]) -> None:
        if not pending.storage:  # DeepSpeed made the step's directory on storage: nothing goes
            with contextlib.suppress(OSError):  # there, so it goes (only if still empty)
                pending.directory.rmdir()
            return
        self._failed = pending.directory  # until the manifest makes it a checkpoint
        if self.memory is not None:
            for record in pending.records:  # the same bytes: the records stand
                copy_durable(pending.first / record.path, pending.directory / record.path)
        write_rank_marker(pending.directory, rank=self.rank, files=pending.records)
        if self.rank != 0:
            self._failed = None
            return
        files = collect_rank_markers(
            pending.directory, world_size=self.world_size, timeout=self.marker_timeout
        )
        manifest = Manifest.model_validate({**fields, "files": files, "saved_at": utc_now()})
        write_manifest(pending.directory, manifest)
        self._failed = None
        remove_rank_markers(pending.directory)
        set_latest(self.root, to=pending.directory)
        prune(self.root, keep=self.keep)
        if self.on_saved is not None:
            self.on_saved(Saved(pending.directory, manifest, time.perf_counter() - pending.started))
