"""Process trees: torchrun starts each worker in a session of its own, so signalling the
agent's process group misses them; these helpers find and signal the whole tree."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [root]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def signal_tree(root: int, signum: int) -> None:
    """Signal ``root`` and everything under it (collected first: a dying parent orphans)."""
    for pid in [root, *descendants(root)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)
