"""Checksums of checkpoint files: computed while they are written, checked when they are read.

Writing goes through :class:`HashingFile`, so a file's crc32 costs nothing extra: the bytes are
hashed on their way to the disk instead of read back. Verification reads files back with
:func:`crc32_file` (see ``catalog``). Torch-free, like the rest of the store.
"""

from __future__ import annotations

import io
import os
import threading
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from .manifest import FileRecord

CHUNK = 8 << 20  # verification reads this much per call into a buffer reused by its thread


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


_buffers = threading.local()  # one read buffer per hashing thread


def crc32_file(path: Path) -> tuple[int, int]:
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
    return crc, size
