"""The worker agents of a local run: one ``python -m pretrain_trainer.agent`` per slot, started
once and kept warm across attempts, and the small HTTP client that instructs it.

A slot's agent holds the slot's in-memory checkpoint tier (a directory on ``/dev/shm``). When
the slot is taken away (``pretrainctl workers kill``: a lost node), the agent's whole process
tree is killed and its tier removed, as a node's memory would go with it.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

from pretrain_trainer import contract
from pretrain_trainer.agent_client import AgentClient
from pretrain_trainer.lifetime import die_with_parent

from .processes import signal_tree


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def memory_base(job: str, run_dir: Path) -> Path:
    """Where a run's slots keep their in-memory tiers: a tmpfs when there is one."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        return shm / f"pretrain-{job}-{zlib.crc32(str(run_dir).encode()):08x}"
    return run_dir / "memory"


class AgentProcess:
    """One slot's agent: its process, its port, its tier."""

    def __init__(
        self,
        *,
        slot: int,
        nproc: int,
        env: dict[str, str],
        cwd: Path,
        folder: Path,
        memory: Path,
    ) -> None:
        self.slot, self.memory, self.port = slot, memory, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pretrain_trainer.agent",
            f"--port={self.port}",
            "--host=127.0.0.1",
            f"--nproc={nproc}",
            f"--dir={folder}",
        ]
        env = {**env, contract.ENV_MEMORY_ROOT: str(memory)}
        with (folder / "agent.log").open("ab") as log:
            self.popen = subprocess.Popen(
                command,
                env=env,
                cwd=cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        self.client = AgentClient(f"127.0.0.1:{self.port}")
        self.started = time.time()
        self.ended: float | None = None

    def alive(self) -> bool:
        if self.popen.poll() is None:
            return True
        if self.ended is None:
            self.ended = time.time()
        return False

    def state(self) -> contract.AgentState:
        return self.client.state()

    def run(self, order: contract.AttemptOrder) -> contract.AgentState:
        return self.client.run(order)

    def stop(self, attempt: int, *, grace: float) -> contract.AgentState:
        return self.client.stop(attempt, grace=grace)

    def kill(self) -> None:
        """The node goes: the agent, its trainers and its memory."""
        if self.popen.poll() is None:
            signal_tree(self.popen.pid, signal.SIGKILL)
            self.popen.wait()
        if self.ended is None:
            self.ended = time.time()
        shutil.rmtree(self.memory, ignore_errors=True)

    def close(self, *, timeout: float) -> None:
        """Stop the agent (its trainers first, which may save), then remove its tier."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        self.kill()
