"""The store's writes beside the manifest: ``latest``, rank markers, and refused storage.

``latest`` names the newest complete checkpoint, replaced atomically after each manifest.
Rank markers let rank 0 learn that every rank's files are on disk without a collective
(saves complete on background threads). :class:`StorageError` is what a write the storage
refuses becomes: the one checkpoint failure that retrying cannot fix. Paths and names come
from :mod:`.layout`, manifests from :mod:`.manifest`, atomic writes from ``fsio``.

This module imports neither torch nor numpy: the operator side and tools can inspect, verify
and prune checkpoints without the trainer's dependencies.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from ..errors import PermanentError
from ..fsio import replace_atomic, write_json_atomic
from .layout import LATEST, RANK_MARKER_GLOB, is_rank_marker, probe_name, rank_marker_name
from .manifest import CheckpointError, FileRecord


class StorageError(PermanentError):
    """The checkpoint storage cannot take a write (full, read-only, not a directory, over a
    quota): retrying cannot help until someone frees or fixes it. Earlier checkpoints stay."""


# Errors that say the storage itself refuses writes, as opposed to a transient I/O problem.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)


def storage_error(error: BaseException) -> OSError | None:
    """The storage-refuses-writes error behind ``error``, if that is what it is."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    return None


def check_writable(root: Path, *, name: str) -> None:
    """Fail before training starts, not at the first save, when ``root`` cannot be written."""
    probe = root / probe_name(name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with probe.open("wb") as out:
            out.write(b"\0" * 4096)
            out.flush()
            os.fsync(out.fileno())
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise StorageError(
            f"checkpoint path {root} is not writable: {error.strerror or error}"
        ) from None


def set_latest(root: Path, *, to: Path) -> None:
    """Point ``root``'s ``latest`` at the checkpoint directory ``to``, by its path relative to
    ``root``, so the volume can be mounted anywhere."""
    try:
        relative = to.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise CheckpointError(f"{to} is not under checkpoint root {root}") from None
    if not to.is_dir():
        raise CheckpointError(f"{to}: latest would point at a missing directory")
    replace_atomic(root / LATEST, relative.encode() + b"\n")


def read_latest(root: Path) -> Path | None:
    """The directory ``latest`` points at; None when it is missing, dangling or escapes."""
    try:
        text = (root / LATEST).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    pure = PurePosixPath(text)
    if not text or pure.is_absolute() or ".." in pure.parts:
        return None
    target = root / pure
    return target if target.is_dir() else None


def write_rank_marker(directory: Path, *, rank: int, files: list[FileRecord]) -> None:
    """Tell rank 0 this rank's files are on disk. Markers replace a barrier because saves run
    on background writer threads: a collective issued there would race the training thread's
    collectives on the same process group (NCCL/Gloo require one issue order on every rank),
    which deadlocks or corrupts both. Files on the shared volume need no process group."""
    payload = {"rank": rank, "files": [f.model_dump(mode="json", by_alias=True) for f in files]}
    write_json_atomic(directory / rank_marker_name(rank), payload)


def _read_marker(path: Path, rank: int) -> list[FileRecord]:
    try:
        data = json.loads(path.read_bytes())
        if data.get("rank") != rank:
            raise ValueError(f"says rank {data.get('rank')!r}")
        return [FileRecord.model_validate(f) for f in data["files"]]
    except (ValueError, KeyError, TypeError, AttributeError, ValidationError) as e:
        raise CheckpointError(f"{path}: invalid rank marker: {e}") from None


def collect_rank_markers(
    directory: Path, *, world_size: int, timeout: float, poll: float = 0.05
) -> list[FileRecord]:
    """Rank 0: wait for every rank's marker and merge their file records (sorted by path).
    Markers stay until ``remove_rank_markers`` runs after the manifest is written, so a crash
    in between loses nothing that a retry would need."""
    deadline = time.monotonic() + timeout
    found: dict[int, list[FileRecord]] = {}
    while True:
        for rank in range(world_size):
            path = directory / rank_marker_name(rank)
            if rank not in found and path.exists():
                found[rank] = _read_marker(path, rank)
        missing = [r for r in range(world_size) if r not in found]
        if not missing:
            break
        if time.monotonic() >= deadline:
            names = ", ".join(str(r) for r in missing)
            raise CheckpointError(
                f"{directory}: rank(s) {names} wrote no marker within {timeout:g}s"
            )
        time.sleep(poll)
    merged: dict[str, FileRecord] = {}
    for _, records in sorted(found.items()):
        for record in records:
            if merged.setdefault(record.path, record) != record:
                raise CheckpointError(f"{directory}: ranks disagree about {record.path}")
    return [merged[p] for p in sorted(merged)]


def remove_rank_markers(directory: Path) -> None:
    for path in directory.glob(RANK_MARKER_GLOB):
        if is_rank_marker(path.name):
            path.unlink(missing_ok=True)
