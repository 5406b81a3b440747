"""A process's lifetime tied to its parent's (Linux's ``PR_SET_PDEATHSIG``), for the worker
agent's trainers and fork server, the local run's agents and the test kubelet's containers.
Standard library only."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PDEATHSIG
