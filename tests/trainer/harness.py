"""Run the real trainer (torchrun + DeepSpeed on CPU) and a plain PyTorch reference."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypedDict, Unpack

import torch
import yaml
from pretrain_operator.local.processes import signal_tree
from pretrain_trainer import contract
from pretrain_trainer.config import BatchSplit, RunConfig
from pretrain_trainer.data.loader import DataLoader
from pretrain_trainer.optim import param_groups
from pretrain_trainer.train import build_model, lm_loss
from torch.optim.lr_scheduler import LambdaLR


def run_config(
    corpus: dict[str, Path], *, stages: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    """A small job's run config over the stdlib corpus (two sources: code and prose)."""
    config: dict[str, Any] = {
        "model": {"layers": 2, "hidden": 64, "heads": 4, "vocabSize": 256, "seqLen": 64},
        "data": {"sources": [{"name": n, "path": str(p)} for n, p in sorted(corpus.items())]},
        "stages": stages,
        "trainer": {"logEverySteps": 5, "spikeFactor": 0.0},
    }
    config.update(extra)
    return config


def stage(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "foundation",
        "budget": {"steps": 20},
        "dataMix": {"prose": 1, "code": 1},
        "globalBatchSize": 8,
        "microBatchSize": 2,
        "precision": "fp32",
        "optimizer": {"lr": 3e-3},
        "lrSchedule": {"warmupSteps": 2},
    }
    base.update(fields)
    return base


@dataclass
class Run:
    returncode: int
    stderr: str
    steps: list[dict[str, Any]]
    report: dict[str, Any] | None

    @property
    def losses(self) -> list[float]:
        return [s["loss"] for s in self.steps]


@dataclass
class Started:
    process: subprocess.Popen[str]
    steps: Path
    report: Path
    log: Path

    def step_count(self) -> int:
        if not self.steps.exists():
            return 0
        lines = self.steps.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0

    def signal(self, signum: int) -> None:
        """Signal torchrun and every process under it. torchrun starts each worker in a
        session of its own, so signalling its process group would miss them."""
        signal_tree(self.process.pid, signum)

    def wait(self, timeout: float = 300) -> Run:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(9)
            raise
        stderr = self.log.read_text()
        records = (
            [json.loads(line) for line in self.steps.read_text().splitlines()]
            if self.steps.exists()
            else []
        )
        return Run(
            returncode=self.process.returncode,
            stderr=stderr,
            steps=records,
            report=json.loads(self.report.read_text()) if self.report.exists() else None,
        )


class Launch(TypedDict, total=False):
    """How :func:`start_trainer` starts the trainer; every option may be left out."""

    nproc: int
    """Processes under torchrun (default 1)."""
    stage_index: int
    """The stage to train (default 0)."""
    env: dict[str, str]
    """Added to (and overriding) the contract's environment."""
    torchrun: bool
    """False: one process without torchrun (default True)."""
    file_size_limit: int
    """Caps every file the trainer writes (RLIMIT_FSIZE): a full disk, to it."""


def start_trainer(workdir: Path, config: dict[str, Any], **launch: Unpack[Launch]) -> Started:
    """Start the trainer in its own process group; the step log is fresh for each start."""
    nproc, stage_index = launch.get("nproc", 1), launch.get("stage_index", 0)
    file_size_limit = launch.get("file_size_limit")
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    steps, report = workdir / f"steps-{stage_index}.jsonl", workdir / f"report-{stage_index}.json"
    steps.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    environ = {
        **os.environ,
        contract.ENV_JOB: "test",
        contract.ENV_STAGE: str(stage_index),
        contract.ENV_RUN_CONFIG: str(config_path),
        contract.ENV_CHECKPOINT_ROOT: str(workdir / "checkpoints"),
        contract.ENV_REPORT_PATH: str(report),
        contract.ENV_STEP_LOG: str(steps),
        "OMP_NUM_THREADS": "1",
        **launch.get("env", {}),
    }
    command = [sys.executable, "-m", "pretrain_trainer"]
    if launch.get("torchrun", True):  # --standalone picks a free rendezvous port
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "pretrain_trainer",
        ]
    log = workdir / f"stderr-{stage_index}.log"
    with log.open("w") as sink:  # a file, not a pipe: a chatty run can never block on it
        process = subprocess.Popen(
            command,
            env=environ,
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=sink,
            text=True,
            start_new_session=True,
            preexec_fn=None if file_size_limit is None else partial(_limit_files, file_size_limit),
        )
    return Started(process, steps, report, log)


def _limit_files(size: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def preempt_after(started: Started, step: int, timeout: float = 240) -> Run:
    """SIGTERM the run once it has finished ``step`` steps; wait for it to exit."""
    deadline = time.monotonic() + timeout
    while started.step_count() < step:
        assert started.process.poll() is None, started.log.read_text()
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.02)
    started.signal(signal.SIGTERM)
    return started.wait()


def run_trainer(
    workdir: Path, config: dict[str, Any], *, timeout: float = 300, **launch: Unpack[Launch]
) -> Run:
    """:func:`start_trainer`, then wait up to ``timeout`` seconds for the trainer to exit."""
    return start_trainer(workdir, config, **launch).wait(timeout=timeout)


def reference_losses(config: dict[str, Any], *, steps: int) -> list[float]:
    return reference_run(config, steps=steps)[0]


def reference_run(config: dict[str, Any], *, steps: int) -> tuple[list[float], list[float]]:
    """The same model, data, AdamW, schedule and clipping in a plain single-process loop;
    returns the losses and the gradient norms before clipping."""
    parsed = RunConfig.parse(config)
    stage_ = parsed.stages[0]
    torch.manual_seed(0)
    data = DataLoader.build(parsed, stage_index=0)
    model = build_model(parsed, stage_)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        param_groups(model),
        lr=stage_.optimizer.lr,
        betas=stage_.optimizer.betas,
        eps=stage_.optimizer.eps,
        weight_decay=stage_.optimizer.weight_decay,
    )
    total, peak = stage_.total_steps(parsed.model), stage_.optimizer.lr
    scheduler = LambdaLR(
        optimizer, lambda s: stage_.lr_schedule.lr_at(s, total_steps=total, lr=peak) / peak
    )
    losses, norms = [], []
    whole = BatchSplit(stage_.global_batch_size // stage_.micro_batch_size, 1)  # any layout
    coef = parsed.model.moe.aux_loss_coef if parsed.model.moe else 0.0
    for _ in range(steps):
        batches = data.next_batch(rank=0, split=whole, device=torch.device("cpu"))
        step_loss = 0.0
        for inputs, targets in batches:
            loss = lm_loss(model(inputs), targets, label_smoothing=stage_.label_smoothing)
            if coef:
                loss = loss + coef * model.aux_loss()
            (loss / len(batches)).backward()
            step_loss += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(params, stage_.grad_clip or float("inf"))
        norms.append(float(norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(step_loss / len(batches))
    return losses, norms
