"""Atomic file writes, in one torch-free place for both halves of the project.

A reader never sees half a file: the payload goes to a temporary file in the same directory
(same filesystem, so the rename is atomic), which is renamed over the target. ``durable``
writes also sync the file and its directory, so the new content survives a power loss (the
checkpoint store needs that; a local run's bookkeeping does not).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def copy_durable(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` (parents created) and fsync it: its bytes are on disk
    when this returns, as a manifest that records them requires."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    with target.open("rb+") as copied:
        os.fsync(copied.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network filesystems cannot sync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def replace_atomic(path: Path, payload: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``payload``, all or nothing. A crash leaves either the old file or
    the new one, plus at most a ``.<name>.*.tmp`` that readers never open."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)  # the rename itself survives a power loss only once this is done


def write_json_atomic(path: Path, data: object, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON (see :func:`replace_atomic`)."""
    text = json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n"
    replace_atomic(path, text.encode(), durable=durable)
