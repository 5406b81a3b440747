"""A DeepSpeed checkpoint engine that blocks training only while state is copied to host memory.

DeepSpeed hands every state dict it saves (module, ZeRO partitions) to ``save``; this engine
snapshots it (tensors copied to host memory, other leaves deep-copied) and returns, and one
background thread per process serialises the snapshots to storage, hashing the bytes as they
are written. ``commit`` queues the completion: the process writes its rank marker; rank 0 waits
for every marker, writes the manifest (the checkpoint now exists), moves ``latest`` and applies
retention. No collective runs on the background thread: it would race the training thread's
collectives on the same process group. The next save waits for the previous one to finish.

Loading memory-maps each file (``torch.load(mmap=True)``), so restoring costs about a read of
the bytes plus one copy into the engine's tensors.
"""

from __future__ import annotations

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

from .catalog import prune
from .hashing import HashingFile
from .manifest import FileRecord, Manifest, utc_now, write_manifest
from .store import (
    StorageError,
    collect_rank_markers,
    remove_rank_markers,
    set_latest,
    storage_error,
    write_rank_marker,
)


class Snapshots:
    """Copies state into host buffers kept from one save to the next.

    Fresh host memory costs far more to touch than to copy into (page faults, zeroing), so the
    first save allocates and every later save of the same shapes only copies: that copy is all
    the training loop waits for. Safe because a save starts only after the previous one has been
    written out entirely.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def take(self, value: Any, key: tuple[Any, ...] = ()) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy(value.detach(), key)
        if isinstance(value, OrderedDict):
            return OrderedDict((k, self.take(v, (*key, k))) for k, v in value.items())
        if isinstance(value, dict):
            return {k: self.take(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [self.take(v, (*key, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self.take(v, (*key, i)) for i, v in enumerate(value))
        try:
            return copy.deepcopy(value)
        except Exception:  # an opaque object DeepSpeed stores by reference; it is not mutated
            return value

    def _copy(self, tensor: torch.Tensor, key: tuple[Any, ...]) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            self._buffers[key] = buffer
        buffer.copy_(tensor)
        return buffer


@dataclass(frozen=True)
class Saved:
    """A checkpoint that became complete (reported on rank 0 only)."""

    directory: Path
    manifest: Manifest
    seconds: float


@dataclass
class _Pending:
    directory: Path
    started: float
    records: list[FileRecord]


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
    ) -> None:
        super().__init__(config_params=None)
        self.name = "pretrain-async"
        self.root, self.rank, self.world_size, self.keep = root, rank, world_size, keep
        self.marker_timeout = marker_timeout
        self.on_saved = on_saved
        self.manifest_fields: dict[str, Any] = {}  # set before each save by the manager
        self.extra_files: dict[str, Any] = {}  # relative path -> object, saved by this rank
        self._pending: _Pending | None = None
        self._snapshots = Snapshots()
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue()
        self._error: BaseException | None = None
        self._failed: Path | None = None  # the checkpoint whose write failed
        threading.Thread(target=self._work, name="checkpoint-writer", daemon=True).start()

    # -- DeepSpeed's interface -------------------------------------------------------------
    def create(self, info: CheckpointCommitInfo) -> None:
        self.wait()
        directory = Path(info.save_dir) / info.tag
        self._pending = _Pending(directory=directory, started=time.perf_counter(), records=[])
        for relative, value in self.extra_files.items():
            self.save(value, str(directory / relative))

    def save(self, state_dict: Any, path: str) -> None:
        pending = self._pending
        if pending is None:
            raise RuntimeError("save() outside create()/commit()")
        target = Path(path)
        frozen = self._snapshots.take(state_dict, (str(target.relative_to(pending.directory)),))
        self._queue.put(lambda: self._write(pending, target, frozen))

    def load(self, path: str, map_location: Any = None) -> Any:
        return torch.load(path, map_location=map_location, mmap=True, weights_only=False)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        pending, fields = self._pending, dict(self.manifest_fields)
        if pending is None:
            raise RuntimeError("commit() without create()")
        self._pending = None
        self._queue.put(lambda: self._complete(pending, fields))
        return True

    # -- ours --------------------------------------------------------------------------------
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
                if self._error is None:
                    job()
            except BaseException as error:  # reported by the next wait()
                self._error = error
            finally:
                self._queue.task_done()

    def _write(self, pending: _Pending, target: Path, value: Any) -> None:
        self._failed = pending.directory  # until the write below has succeeded
        target.parent.mkdir(parents=True, exist_ok=True)
        with HashingFile(target) as out:
            torch.save(value, cast(IO[bytes], out))
        pending.records.append(out.record(relative_to=pending.directory))
        self._failed = None

    def _complete(self, pending: _Pending, fields: dict[str, Any]) -> None:
        self._failed = pending.directory  # until the manifest makes it a checkpoint
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
