"""Reading a job's checkpoints: which exist, which verify, which to keep.

Verification checks every file's size (cheap) and crc32 (threads over large chunks; zlib
releases the GIL) against the manifest. ``newest_valid`` logs each checkpoint it rejects and
why, so a fallback is never silent. Retention keeps the newest ``keep`` checkpoints and every
stage's final one, and never deletes what ``latest`` points at or a save still in flight.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..fsio import TMP_SUFFIX, fsync_dir
from .hashing import crc32_file
from .layout import LATEST, MANIFEST, STAGE_GLOB, STEP_GLOB, checkpoint_name, stage_of, step_of
from .manifest import CheckpointError, FileRecord, Manifest, read_manifest
from .store import read_latest


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint on disk (its manifest parsed and matching its directory name)."""

    directory: Path
    stage: int
    step: int
    manifest: Manifest

    @property
    def name(self) -> str:
        return checkpoint_name(stage=self.stage, step=self.step)


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found: each problem names a file; the cost says what it read."""

    ok: bool
    problems: list[str]
    bytes_read: int
    seconds: float


def verify(
    directory: Path, manifest: Manifest, *, checksums: bool = True, workers: int = 4
) -> Verification:
    """Check each recorded file: present, of the recorded size (a cheap stat, always), and with
    the recorded crc32 (a full read, when ``checksums``). Files not in the manifest, such as a
    ``universal/`` conversion folder added later, are allowed."""
    started = time.perf_counter()
    problems: list[str] = []
    to_hash: list[FileRecord] = []
    for record in manifest.files:
        try:
            size = (directory / record.path).stat().st_size
        except FileNotFoundError:
            problems.append(f"{record.path}: missing")
            continue
        if size != record.size:
            problems.append(f"{record.path}: size {size} != {record.size} (truncated or wrong)")
        elif checksums:
            to_hash.append(record)
    to_hash.sort(key=lambda r: -r.size)  # largest first balances the threads best

    def check(record: FileRecord) -> tuple[int, str | None]:
        try:
            crc, size = crc32_file(directory / record.path)
        except OSError as e:
            return 0, f"{record.path}: unreadable: {e}"
        if crc != record.crc32:
            return size, f"{record.path}: crc32 mismatch ({crc:08x} != {record.crc32:08x})"
        return size, None

    bytes_read = 0
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for size, problem in pool.map(check, to_hash):
            bytes_read += size
            if problem:
                problems.append(problem)
    return Verification(not problems, problems, bytes_read, time.perf_counter() - started)


def _step_dirs(root: Path) -> list[tuple[int, int, Path]]:
    """(stage, step, directory) of every step directory, newest first; names the layout does
    not produce (``step-007``, ``step-x``) are not ours and are ignored."""
    out = []
    for stage_dir in root.glob(STAGE_GLOB):
        stage = stage_of(stage_dir.name)
        if stage is None or not stage_dir.is_dir():
            continue
        for step_dir in stage_dir.glob(STEP_GLOB):
            step = step_of(step_dir.name)
            if step is not None and step_dir.is_dir():
                out.append((stage, step, step_dir))
    return sorted(out, reverse=True)


def _complete(directory: Path, *, stage: int, step: int) -> Checkpoint | None:
    try:
        manifest = read_manifest(directory)
    except CheckpointError:
        return None
    if (manifest.stage, manifest.step) != (stage, step):
        return None
    return Checkpoint(directory=directory, stage=stage, step=step, manifest=manifest)


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Complete checkpoints, newest (highest stage, then step) first."""
    found = (_complete(d, stage=s, step=n) for s, n, d in _step_dirs(root))
    return [c for c in found if c is not None]


def incomplete(root: Path) -> list[Path]:
    """Step directories without a valid manifest matching their name."""
    return [d for s, n, d in _step_dirs(root) if _complete(d, stage=s, step=n) is None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def newest_valid(
    root: Path,
    *,
    stage: int | None = None,
    final: bool | None = None,
    checksums: bool = True,
    workers: int = 4,
    log: Callable[[str], None] = _stderr,
) -> tuple[Checkpoint, Verification] | None:
    """The newest checkpoint that verifies (optionally of one stage, or only finals); each one
    rejected on the way is logged with why, so a fallback is never silent."""
    for checkpoint in list_checkpoints(root):
        if stage is not None and checkpoint.stage != stage:
            continue
        if final is not None and checkpoint.manifest.final != final:
            continue
        result = verify(
            checkpoint.directory, checkpoint.manifest, checksums=checksums, workers=workers
        )
        if result.ok:
            return checkpoint, result
        log(f"skipping {checkpoint.name}: {'; '.join(result.problems)}")
    return None


# ---------------------------------------------------------------------------------------------
# Retention


def retention(checkpoints: list[Checkpoint], *, keep: int) -> list[Checkpoint]:
    """Which checkpoints to delete: all but the newest ``keep`` and every stage's final one."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    ordered = sorted(checkpoints, key=lambda c: (c.stage, c.step), reverse=True)
    return [c for c in ordered[keep:] if not c.manifest.final]


def _rmtree(directory: Path) -> None:
    """rmtree that tolerates entries vanishing under it (another process cleaning too)."""
    try:
        shutil.rmtree(directory)
    except FileNotFoundError:
        if directory.exists():
            shutil.rmtree(directory)


def _remove(directory: Path) -> None:
    # Manifest first: a crash halfway through leaves an incomplete directory, never a
    # "complete" checkpoint with files missing.
    (directory / MANIFEST).unlink(missing_ok=True)
    fsync_dir(directory)
    _rmtree(directory)


def prune(root: Path, *, keep: int) -> list[Path]:
    """Apply ``retention``; never deletes what ``latest`` points at. Only complete checkpoints
    are candidates, so a save in progress (no manifest yet) is never touched."""
    latest = read_latest(root)
    protected = latest.resolve() if latest is not None else None
    removed = []
    for checkpoint in retention(list_checkpoints(root), keep=keep):
        if checkpoint.directory.resolve() != protected:
            _remove(checkpoint.directory)
            removed.append(checkpoint.directory)
    return removed


def clean_incomplete(root: Path) -> list[Path]:
    """Remove incomplete step directories and leftover temporary files of crashed writers.
    Call at startup only, when no save is in flight (a save in flight looks incomplete)."""
    removed = []
    for directory in incomplete(root):
        _rmtree(directory)
        removed.append(directory)
    for tmp in root.glob(f".{LATEST}.*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
