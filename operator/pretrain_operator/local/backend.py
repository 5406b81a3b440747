"""Observe and apply for a local run: one long-lived worker agent per slot.

Each slot's agent (:mod:`.agents`, ``python -m pretrain_trainer.agent``) starts when the slot
becomes available and stays: torch and DeepSpeed are imported once, and each attempt's trainer
processes are forks of its fork server, told their ranks by the attempt's order and meeting
under the attempt's prefix in the run's long-lived store. A resize or a restart is a new
attempt at a size the planner chose (docs/design.md, "How a job runs"); only the way it reaches
a slot is an HTTP call. A slot is a place a worker may run; ``pretrainctl workers kill|add``
takes slots away and gives them back (a lost node takes its agent and its memory with it),
which is how a user watches elasticity happen on one machine.

Run directory::

    run.yaml  status.json  capacity.json  steps.jsonl  checkpoints/
    workers/<slot>/agent.log  workers/<slot>/attempt-<a>.log  workers/<slot>/report-<a>.json
    export/attempt-<n>.log    (spec.export: the export's tries, :mod:`.exporter`)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from pretrain_trainer import contract
from pretrain_trainer.agent_client import AgentError
from pretrain_trainer.fsio import write_json_atomic

from ..api import PretrainJob
from ..plan import Group, Observed, Plan, Worker, WorkerState, agent_exited
from .agents import AgentProcess, memory_base
from .exporter import Exporter

CAPACITY = "capacity.json"
STOP_GRACE = 60.0  # seconds a stopped trainer has to save before it is killed


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
        self.memory = memory_base(job.name, run_dir)
        shutil.rmtree(self.memory, ignore_errors=True)  # a crashed run's: no agent holds it
        self.agents: dict[int, AgentProcess] = {}
        self.states: dict[int, contract.AgentState] = {}
        self.stopping: dict[int, int] = {}  # slot -> the attempt asked to stop there
        self.lost: dict[int, Worker] = {}  # a slot whose agent died, reported once
        self.attempt = 0
        self.group: Group | None = None
        self.exporter = Exporter(run_dir=run_dir, env=worker_env(job, run_dir))

    # -- observe ---------------------------------------------------------------------------
    def observe(self) -> Observed:
        capacity, down = read_capacity(self.run_dir)
        workers = []
        for slot in sorted(set(range(capacity)) | set(self.agents)):
            agent = self.agents.get(slot)
            if slot in down or slot >= capacity:
                if agent is not None:
                    agent.kill()  # the "node" went away, with its memory
                    self._forget(slot, agent, reason="its slot was taken away")
                continue  # the slot is gone: its worker, if any, is lost
            if agent is not None and not agent.alive():
                self._forget(slot, agent, reason=f"agent exited with code {agent.popen.returncode}")
                agent = None
            if agent is None:
                self.agents[slot] = agent = self._agent(slot)
            workers.append(self._worker(slot, agent))
        return Observed(tuple(workers), export=self.exporter.observe())

    def _forget(self, slot: int, agent: AgentProcess, *, reason: str) -> None:
        """A slot's agent is gone: its running attempt's worker is lost (reported once)."""
        del self.agents[slot]
        state = self.states.pop(slot, None)
        if state is not None and state.running and state.attempt is not None:
            self.lost[slot] = Worker(
                slot=slot,
                state=WorkerState.LOST,
                attempt=state.attempt,
                stage=state.stage,
                reason=reason,
                ended_at=agent.ended,
            )

    def _agent(self, slot: int) -> AgentProcess:
        env = worker_env(self.job, self.run_dir)
        if self.metrics_port is not None:
            env[contract.ENV_METRICS_PORT] = str(self.metrics_port + slot)
        return AgentProcess(
            slot=slot,
            nproc=self.job.spec.nproc_per_worker,
            env=env,
            cwd=self.run_dir,
            folder=self.run_dir / "workers" / str(slot),
            memory=self.memory / f"slot-{slot}",
        )

    def _worker(self, slot: int, agent: AgentProcess) -> Worker:
        lost, group = self.lost.get(slot), self.group
        if lost is not None and group is not None and lost.attempt == group.attempt:
            return lost
        # Once the planner acted on the loss (a new attempt, or waiting for workers with none
        # running), the slot's new agent is a worker like any other.
        self.lost.pop(slot, None)
        try:
            state = self.states[slot] = agent.state()
        except AgentError:  # still importing
            state = self.states.get(slot) or contract.AgentState(agent="")
        waiting = group is not None and slot in group.slots and state.attempt != group.attempt
        if waiting and group is not None:  # its start waits for the old worker to leave
            return Worker(
                slot=slot, state=WorkerState.PENDING, attempt=group.attempt, stage=group.stage
            )
        attempt, stage = state.attempt, state.stage
        if attempt is None:
            return Worker(slot=slot, state=WorkerState.IDLE)
        if state.running:
            return Worker(
                slot=slot,
                state=WorkerState.RUNNING,
                attempt=attempt,
                stage=stage,
                bound_at=state.started_at,
            )
        current = group is not None and group.attempt == attempt
        if self.stopping.get(slot) == attempt or attempt < self.attempt or not current:
            # Stopped on purpose, or history: the planner has acted on its end already (as a
            # finished pod of an old attempt is deleted on Kubernetes), so the slot is free.
            return Worker(slot=slot, state=WorkerState.IDLE)
        return agent_exited(slot, state)

    # -- apply -------------------------------------------------------------------------------
    def apply(self, result: Plan) -> None:
        self.attempt, self.group = result.status.attempt, result.group
        self.exporter.apply(result.export)
        for slot in result.stop:
            self.stop(slot)
        group = result.group
        if group is None:
            return
        for rank, slot in enumerate(group.slots):
            agent, state = self.agents.get(slot), self.states.get(slot)
            if agent is None or state is None or not state.agent:
                continue  # not up yet: the next pass tries again
            if state.attempt == group.attempt:
                continue  # already started for this attempt
            if state.running:
                self.stop(slot)  # the old attempt's worker still leaving: start it next time
                continue
            order = contract.AttemptOrder(
                attempt=group.attempt,
                stage=group.stage,
                rank=rank,
                workers=group.world,
                store=f"127.0.0.1:{self.store_port}",
            )
            try:
                self.states[slot] = agent.run(order)
            except AgentError:
                continue

    def stop(self, slot: int) -> None:
        """Ask a worker to stop (SIGTERM: the trainer may save; killed after a grace)."""
        agent, state = self.agents.get(slot), self.states.get(slot)
        if agent is None or state is None or state.attempt is None:
            return
        if self.stopping.get(slot) == state.attempt:
            return
        self.stopping[slot] = state.attempt  # an exited one too: its slot is free again
        if not state.running:
            return
        with contextlib.suppress(AgentError):
            self.states[slot] = agent.stop(state.attempt, grace=STOP_GRACE)

    def shutdown(self, *, timeout: float = 60.0) -> None:
        """Stop every worker, waiting for them (their preemption saves included), then the
        agents; their memory goes with them."""
        self.exporter.stop()
        for slot in list(self.agents):
            self.stop(slot)
        deadline = time.monotonic() + timeout
        for agent in list(self.agents.values()):
            while agent.alive() and time.monotonic() < deadline:
                try:
                    if not agent.state().running:
                        break
                except AgentError:
                    break
                time.sleep(0.1)
            agent.close(timeout=10)
        self.agents.clear()
        shutil.rmtree(self.memory, ignore_errors=True)


def worker_env(
    job: PretrainJob,
    run_dir: Path,
    *,
    stage: int | None = None,
    attempt: int | None = None,
    report: Path | None = None,
) -> dict[str, str]:
    """The trainer contract's environment for a worker of a local run: the job's part (what
    an agent gets), and the attempt's when given (what a trainer started directly gets)."""
    env = {
        **os.environ,
        contract.ENV_JOB: job.name,
        contract.ENV_NAMESPACE: "local",
        contract.ENV_RUN_CONFIG: str(run_dir / "run.yaml"),
        contract.ENV_CHECKPOINT_ROOT: str(run_dir / "checkpoints"),
        contract.ENV_STEP_LOG: str(run_dir / "steps.jsonl"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    for name, value in (
        (contract.ENV_STAGE, stage),
        (contract.ENV_ATTEMPT, attempt),
        (contract.ENV_REPORT_PATH, report),
    ):
        if value is not None:
            env[name] = str(value)
    return env


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
