"""Observe and apply for a local run: one ``torchrun`` agent per worker slot.

Each attempt's agents meet at the run's long-lived store under a fresh rendezvous id
(``--nnodes`` fixed by the plan, ``--max-restarts=0``): a resize or a restart is a new attempt
at a size the planner chose, never torchrun's own membership changes (docs/design.md, "How a
job runs"). A slot is a place a worker may run; ``pretrainctl workers kill|add`` takes slots
away and gives them back, which is how a user watches elasticity happen on one machine.

Run directory::

    run.yaml  status.json  capacity.json  steps.jsonl  checkpoints/
    workers/<slot>/attempt-<a>.log  workers/<slot>/report-<a>.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pretrain_trainer import contract
from pretrain_trainer.fsio import write_json_atomic

from ..api import PretrainJob
from ..plan import Group, Observed, Plan, Worker, WorkerState, exited
from .processes import signal_tree

CAPACITY = "capacity.json"


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    attempt: int
    stage: int
    report: Path
    stopping: bool = False
    started: float = field(default_factory=time.time)
    ended: float | None = None
    """When it was first seen gone (or killed here)."""

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = time.time()
        return code


def read_capacity(run_dir: Path) -> tuple[int, set[int]]:
    """How many slots the run may use, and which of them are down."""
    try:
        data = json.loads((run_dir / CAPACITY).read_text())
        return int(data["workers"]), {int(s) for s in data.get("down", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return 0, set()


def write_capacity(run_dir: Path, workers: int, down: set[int]) -> None:
    capacity = {"workers": workers, "down": sorted(down)}
    write_json_atomic(run_dir / CAPACITY, capacity, durable=False)


class LocalBackend:
    def __init__(
        self, *, job: PretrainJob, run_dir: Path, store_port: int, metrics_port: int | None = None
    ) -> None:
        """``metrics_port``: slot s's trainer serves its metrics on ``metrics_port + s``."""
        self.job, self.run_dir, self.store_port = job, run_dir, store_port
        self.metrics_port = metrics_port
        self.processes: dict[int, _Process] = {}
        self.attempt = 0
        self.group: Group | None = None

    # -- observe ---------------------------------------------------------------------------
    def observe(self) -> Observed:
        capacity, down = read_capacity(self.run_dir)
        workers = []
        for slot in sorted(set(range(capacity)) | set(self.processes)):
            process = self.processes.get(slot)
            if slot in down or slot >= capacity:
                if process is not None and process.popen.poll() is None:
                    signal_tree(process.popen.pid, signal.SIGKILL)  # the "node" went away
                    process.popen.wait()
                    process.ended = time.time()
                continue  # the slot is gone: its worker, if any, is lost
            workers.append(self._worker(slot, process))
        return Observed(tuple(workers))

    def _worker(self, slot: int, process: _Process | None) -> Worker:
        group = self.group
        waiting = (
            group is not None
            and slot in group.slots
            and (process is None or process.attempt != group.attempt)
        )
        if waiting and group is not None:  # its start waits for the old worker to leave
            return Worker(
                slot=slot, state=WorkerState.PENDING, attempt=group.attempt, stage=group.stage
            )
        if process is None:
            return Worker(slot=slot, state=WorkerState.IDLE)
        code = process.poll()
        attempt, stage = process.attempt, process.stage
        if code is None:
            return Worker(
                slot=slot,
                state=WorkerState.RUNNING,
                attempt=attempt,
                stage=stage,
                bound_at=process.started,
            )
        if process.stopping or attempt < self.attempt:
            return Worker(slot=slot, state=WorkerState.IDLE)  # stopped on purpose, or history
        if code < 0:
            return Worker(
                slot=slot,
                state=WorkerState.LOST,
                attempt=attempt,
                stage=stage,
                reason=f"killed by signal {-code}",
                ended_at=process.ended,
            )
        worker = exited(
            slot=slot,
            attempt=attempt,
            stage=stage,
            succeeded=code == 0,
            exit_code=code,
            report=contract.read_report(process.report),
        )
        return replace(worker, ended_at=process.ended)

    # -- apply -------------------------------------------------------------------------------
    def apply(self, result: Plan) -> None:
        self.attempt, self.group = result.status.attempt, result.group
        for slot in result.stop:
            self.stop(slot)
        if result.group is None:
            return
        for slot in result.group.slots:
            process = self.processes.get(slot)
            if process is not None and process.attempt == result.group.attempt:
                continue  # already started for this attempt
            if process is not None and process.popen.poll() is None:
                self.stop(slot)  # the old attempt's worker still leaving: start it next time
                continue
            self._start(slot, group=result.group)

    def stop(self, slot: int) -> None:
        """Ask a worker to stop (SIGTERM: torchrun forwards it, the trainer may save)."""
        process = self.processes.get(slot)
        if process is not None and process.popen.poll() is None and not process.stopping:
            process.stopping = True
            process.popen.send_signal(signal.SIGTERM)

    def kill(self, slot: int) -> None:
        process = self.processes.get(slot)
        if process is not None and process.popen.poll() is None:
            signal_tree(process.popen.pid, signal.SIGKILL)
            process.popen.wait()

    def shutdown(self, *, timeout: float = 60.0) -> None:
        """Stop every worker, waiting for them (their preemption saves included)."""
        for slot in list(self.processes):
            self.stop(slot)
        for process in self.processes.values():
            try:
                process.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                signal_tree(process.popen.pid, signal.SIGKILL)
                process.popen.wait()

    def _start(self, slot: int, *, group: Group) -> None:
        stage, attempt, world = group.stage, group.attempt, group.world
        folder = self.run_dir / "workers" / str(slot)
        folder.mkdir(parents=True, exist_ok=True)
        report = folder / f"report-{attempt}.json"
        env = worker_env(self.job, self.run_dir, stage=stage, attempt=attempt, report=report)
        if self.metrics_port is not None:
            env[contract.ENV_METRICS_PORT] = str(self.metrics_port + slot)
        command = torchrun_command(
            self.job,
            store_port=self.store_port,
            rdzv_id=f"{self.job.name}-a{attempt}",
            nnodes=str(world),
        )
        with (folder / f"attempt-{attempt}.log").open("ab") as log:
            popen = subprocess.Popen(
                command,
                env=env,
                cwd=self.run_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes[slot] = _Process(popen, attempt, stage, report)


def worker_env(
    job: PretrainJob, run_dir: Path, *, stage: int, attempt: int, report: Path
) -> dict[str, str]:
    """The trainer contract's environment for one worker of a local run."""
    return {
        **os.environ,
        contract.ENV_JOB: job.name,
        contract.ENV_NAMESPACE: "local",
        contract.ENV_STAGE: str(stage),
        contract.ENV_ATTEMPT: str(attempt),
        contract.ENV_RUN_CONFIG: str(run_dir / "run.yaml"),
        contract.ENV_CHECKPOINT_ROOT: str(run_dir / "checkpoints"),
        contract.ENV_REPORT_PATH: str(report),
        contract.ENV_STEP_LOG: str(run_dir / "steps.jsonl"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def torchrun_command(
    job: PretrainJob,
    *,
    store_port: int,
    rdzv_id: str,
    nnodes: str,
    rdzv_conf: str = "",
    max_restarts: int = 0,
) -> list[str]:
    """A torchrun agent on this machine that meets its peers at the run's store."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *contract.torchrun_args(
            nproc=job.spec.nproc_per_worker,
            endpoint=f"127.0.0.1:{store_port}",
            rdzv_id=rdzv_id,
            nnodes=nnodes,
            rdzv_conf=rdzv_conf,
            max_restarts=max_restarts,
        ),
    ]
