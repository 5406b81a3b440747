"""How a benchmark starts itself again under ``torchrun --standalone``, with the trainer
contract's environment pointing at a run config it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pretrain_trainer import contract


def rerun_under_torchrun(
    script: str, args: list[str], *, nproc: int, config: Path, threads: int
) -> int:
    """Run ``script`` with ``args`` on ``nproc`` local processes; returns torchrun's exit code."""
    env = {
        **os.environ,
        contract.ENV_JOB: "bench",
        contract.ENV_STAGE: "0",
        contract.ENV_RUN_CONFIG: str(config),
        "OMP_NUM_THREADS": str(threads),
    }
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*torchrun, f"--nproc-per-node={nproc}", script, *args]
    return subprocess.run(command, env=env, check=False).returncode
