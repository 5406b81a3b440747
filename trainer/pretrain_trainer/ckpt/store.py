"""The on-disk checkpoint store: layout, manifests, atomic writes, ``latest``, rank markers.

Layout under a job's root::

    <root>/latest                        "stage-1/step-40", replaced atomically
    <root>/stage-<s>/step-<n>/...        DeepSpeed's files, any names, subfolders allowed
    <root>/stage-<s>/step-<n>/manifest.json   written last

A checkpoint directory without a valid manifest does not exist: the manifest is written only
after every file is on disk, by an atomic rename, so a crash at any moment leaves either a
complete checkpoint or an incomplete directory that readers skip and ``clean_incomplete``
removes. The manifest records every file's size and crc32, so a torn or bit-rotted checkpoint
is detected before it is loaded and the newest *valid* one is used instead (see ``catalog``).

This module imports neither torch nor numpy: the operator side and tools can inspect, verify
and prune checkpoints without the trainer's dependencies.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..config.base import Spec
from ..fsio import TMP_SUFFIX, fsync_dir, replace_atomic, write_json_atomic

MANIFEST = "manifest.json"
LATEST = "latest"
MANIFEST_VERSION = 1
CHUNK = 8 << 20  # verify reads this much per call into a buffer reused by its thread

_STAGE = re.compile(r"stage-(0|[1-9][0-9]*)")
_STEP = re.compile(r"step-(0|[1-9][0-9]*)")
_MARKER = re.compile(r"\.rank-(0|[1-9][0-9]*)\.json")

NonNegative = Annotated[int, Field(ge=0)]


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or corrupt; the message names the directory."""


class StorageError(Exception):
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
    probe = root / f".probe-{name}"
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


class FileRecord(Spec):
    """One file of a checkpoint: where it lies inside the checkpoint directory, and its bytes."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]
    """Relative POSIX path inside the checkpoint directory."""
    size: NonNegative
    """Size in bytes."""
    crc32: Annotated[int, Field(ge=0, le=2**32 - 1)]
    """zlib.crc32 of the whole file."""

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        # The path is joined to the directory and opened: never let a manifest point outside it.
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or str(pure) != value or "\\" in value:
            raise ValueError(f"{value!r} is not a normalised relative POSIX path")
        return value


class Manifest(Spec):
    """What a complete checkpoint holds; its presence is what makes the checkpoint exist."""

    version: int = MANIFEST_VERSION
    """Layout version; readers refuse versions they do not know."""
    job: str
    stage: NonNegative
    stage_name: str
    step: NonNegative
    tokens: NonNegative
    """Training tokens consumed in the stage up to this step."""
    world_size: Annotated[int, Field(ge=1)]
    zero_stage: Annotated[int, Field(ge=0, le=3)]
    config_hash: str
    """``config_hash`` of the run configuration that wrote the checkpoint."""
    final: bool
    """The stage's last checkpoint: kept forever, and the next stage starts from it."""
    saved_at: str
    """ISO 8601 UTC time of the save."""
    sampler: dict[str, Any]
    """The data sampler's state (opaque JSON)."""
    files: list[FileRecord]
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known(self) -> Manifest:
        if self.version != MANIFEST_VERSION:
            raise ValueError(f"manifest version {self.version} is not {MANIFEST_VERSION}")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists a path twice")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk (its manifest parsed and matching its directory name)."""

    directory: Path
    stage: int
    step: int
    manifest: Manifest

    @property
    def name(self) -> str:
        return f"stage-{self.stage}/step-{self.step}"


@dataclass(frozen=True)
class Verification:
    ok: bool
    problems: list[str]
    bytes_read: int
    seconds: float


def utc_now() -> str:
    """A ``savedAt`` value: ISO 8601 UTC, second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def checkpoint_dir(root: Path, *, stage: int, step: int) -> Path:
    return root / f"stage-{stage}" / f"step-{step}"


def config_hash(data: object) -> str:
    """sha256 of canonical JSON, so that equal configurations hash equally whatever the key
    order. A pydantic model is dumped by alias first (the wire form)."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", by_alias=True)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing


class HashingFile(io.BufferedIOBase, BinaryIO):
    """A write-only binary file that computes the crc32 and size of what passes through it.

    Pass it to ``torch.save(obj, f)``: torch calls ``f.write`` with its zip stream, so the
    checksum comes for free while the bytes are still in cache, instead of a second read of a
    multi-GB file. It is not seekable (so nothing can rewrite bytes already hashed) and has no
    ``fileno`` (so nothing writes around it). It is typed as a ``BinaryIO`` so that
    ``torch.save`` accepts it without a cast. ``close`` fsyncs, so a manifest that records the
    file is never on disk before the file's data.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.size = 0
        self.crc32 = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "wb", buffering=1 << 20)  # noqa: SIM115 (closed in close)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self.size

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError(f"write to closed file {self.path}")
        view = memoryview(data).cast("B")
        self._file.write(view)
        self.crc32 = zlib.crc32(view, self.crc32)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        if hasattr(self, "_file") and not self._file.closed:
            self._file.flush()

    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def mode(self) -> str:
        return "wb"

    def close(self) -> None:
        if self.closed or not hasattr(self, "_file"):  # closed, or __init__ failed to open
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
            super().close()  # marks this object closed (IOBase.close calls flush: a no-op now)

    def record(self, relative_to: Path) -> FileRecord:
        if not self.closed:
            raise ValueError(f"{self.path}: record() before close(): the file is not yet synced")
        path = self.path.relative_to(relative_to).as_posix()
        return FileRecord(path=path, size=self.size, crc32=self.crc32)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Commit a checkpoint: sync every directory entry beneath it, then write the manifest."""
    for sub, _, _ in os.walk(directory):
        fsync_dir(Path(sub))
    write_json_atomic(directory / MANIFEST, manifest.model_dump(mode="json", by_alias=True))


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot read {MANIFEST}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {MANIFEST} is not JSON: {e}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise CheckpointError(f"{directory}: invalid {MANIFEST}: {where}") from None


def _is_bookkeeping(name: str) -> bool:
    return name == MANIFEST or bool(_MARKER.fullmatch(name)) or name.endswith(TMP_SUFFIX)


_buffers = threading.local()  # one read buffer per hashing thread


def _crc32(path: Path, *, sync: bool = False) -> tuple[int, int]:
    """crc32 and size of a file, read in large chunks into this thread's reusable buffer
    (zlib.crc32 releases the GIL, so threads hash files in parallel)."""
    buf: bytearray | None = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = bytearray(CHUNK)
    view = memoryview(buf)
    crc = size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            crc = zlib.crc32(view[:n], crc)
            size += n
        if sync:
            os.fsync(f.fileno())
    return crc, size


def hash_files(
    directory: Path, *, paths: Iterable[Path] | None = None, sync: bool = True, workers: int = 4
) -> list[FileRecord]:
    """Records for files written without a ``HashingFile`` (DeepSpeed's own ``save_checkpoint``):
    the given paths (relative to ``directory``, or absolute beneath it), or every file under
    ``directory`` except the store's own bookkeeping files. With ``sync`` each file is fsynced
    too, since such writers do not sync."""
    if paths is None:
        paths = [
            Path(sub, name)
            for sub, _, names in os.walk(directory)
            for name in names
            if not (Path(sub) == directory and _is_bookkeeping(name))
        ]
    todo = [directory / p for p in paths]

    def one(path: Path) -> FileRecord:
        crc, size = _crc32(path, sync=sync)
        return FileRecord(path=path.relative_to(directory).as_posix(), size=size, crc32=crc)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return sorted(pool.map(one, todo), key=lambda r: r.path)


# ---------------------------------------------------------------------------------------------
# The latest pointer and rank markers


def set_latest(root: Path, directory: Path) -> None:
    try:
        relative = directory.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        raise CheckpointError(f"{directory} is not under checkpoint root {root}") from None
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: latest would point at a missing directory")
    replace_atomic(root / LATEST, relative.encode() + b"\n")


def read_latest(root: Path) -> Path | None:
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
    write_json_atomic(directory / f".rank-{rank}.json", payload)


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
            path = directory / f".rank-{rank}.json"
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
    for path in directory.glob(".rank-*.json"):
        if _MARKER.fullmatch(path.name):
            path.unlink(missing_ok=True)
