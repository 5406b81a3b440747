"""Checkpoint files sent between ranks over a process group, memory-mapped at both ends.

The sender maps its file and sends it in chunks; the receiver maps a file of the announced size
under a ``.part`` name, receives into it and renames it when the last chunk is in, so a file of
the right name is always whole. Used to copy each worker's in-memory snapshot to a neighbour
(:mod:`.memory`, on the writer's own process group) and to bring a lost worker's files to
the ranks that need them at a restore (:mod:`.recall`, on the training group before it trains).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .layout import PART_SUFFIX

CHUNK = 64 << 20  # bytes per message: large enough to stream, small enough to interleave


@dataclass(frozen=True)
class Piece:
    """A file to send, or to receive: where it lies and how many bytes it holds."""

    path: Path
    size: int


def _chunks(tensor: torch.Tensor) -> Iterable[torch.Tensor]:
    for start in range(0, tensor.numel(), CHUNK):
        yield tensor[start : start + CHUNK]


def _mapped(path: Path, size: int) -> torch.Tensor:
    return torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)


def _receiving(item: Piece) -> tuple[Path, torch.Tensor]:
    part = item.path.with_name(item.path.name + PART_SUFFIX)
    part.parent.mkdir(parents=True, exist_ok=True)
    with part.open("wb") as out:
        out.truncate(item.size)
    return part, _mapped(part, item.size)


def exchange(
    *,
    send: list[Piece],
    to: int | None,
    receive: list[Piece],
    source: int | None,
    group: Any = None,
) -> None:
    """Send ``send`` to rank ``to`` while receiving ``receive`` from rank ``source`` (both
    asynchronous, so a ring of ranks each sending to the next cannot deadlock)."""
    works: list[Any] = []
    keep: list[torch.Tensor] = []
    parts: list[tuple[Path, Path]] = []
    for out in send if to is not None else []:
        if out.size:
            tensor = _mapped(out.path, out.size)
            keep.append(tensor)
            works += [dist.isend(c, dst=to, group=group) for c in _chunks(tensor)]
    for into in receive if source is not None else []:
        if not into.size:
            into.path.parent.mkdir(parents=True, exist_ok=True)
            into.path.write_bytes(b"")
            continue
        part, tensor = _receiving(into)
        keep.append(tensor)
        parts.append((part, into.path))
        works += [dist.irecv(c, src=source, group=group) for c in _chunks(tensor)]
    for work in works:
        work.wait()
    del keep
    for part, final in parts:
        os.replace(part, final)


def send_file(path: Path, size: int, *, to: int, group: Any = None) -> None:
    exchange(send=[Piece(path, size)], to=to, receive=[], source=None, group=group)


def receive_file(path: Path, size: int, *, source: int, group: Any = None) -> None:
    exchange(send=[], to=None, receive=[Piece(path, size)], source=source, group=group)
