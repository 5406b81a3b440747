"""Rank-0 logging: one helper so that N processes print one line, not N."""

from __future__ import annotations

import os
import sys
import time


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def log0(message: str) -> None:
    if is_rank0():
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {message}", file=sys.stderr, flush=True)
