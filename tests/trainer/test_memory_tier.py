"""The in-memory tier and the worker agents, end to end: real agents fork real trainers that
snapshot into their worker's tier and a neighbour's; a lost worker (its agent tree killed and
its memory removed) costs at most the steps since the last snapshot, and training continues
exactly as if nothing had happened."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pretrain_operator.local.agents import AgentProcess
from pretrain_operator.local.store import StoreProcess
from pretrain_trainer import contract
from pretrain_trainer.data import build_stdlib_corpus

from .harness import run_config, stage

pytestmark = pytest.mark.slow
MEMORY_INTERVAL = 2
STEPS = 24


class Workers:
    """A store and one agent per slot, like a local run without the planner."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, slots: int) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "run.yaml").write_text(yaml.safe_dump(config))
        self.steps = workdir / "steps.jsonl"
        env = {
            **os.environ,
            contract.ENV_JOB: "test",
            contract.ENV_RUN_CONFIG: str(workdir / "run.yaml"),
            contract.ENV_CHECKPOINT_ROOT: str(workdir / "checkpoints"),
            contract.ENV_STEP_LOG: str(self.steps),
            "OMP_NUM_THREADS": "1",
        }
        self.store = StoreProcess().start()
        self.agents = [
            AgentProcess(
                slot=s,
                nproc=1,
                env=env,
                cwd=workdir,
                folder=workdir / f"slot-{s}",
                memory=workdir / f"memory-{s}",
            )
            for s in range(slots)
        ]
        for agent in self.agents:
            _until(lambda a=agent: _answers(a), timeout=120)

    def order(self, attempt: int, slots: list[int]) -> None:
        for rank, slot in enumerate(slots):
            self.agents[slot].run(
                contract.AttemptOrder(
                    attempt=attempt,
                    stage=0,
                    rank=rank,
                    workers=len(slots),
                    store=f"127.0.0.1:{self.store.port}",
                )
            )

    def finished(self, slots: list[int], *, timeout: float = 300) -> list[int | None]:
        _until(lambda: not any(self.agents[s].state().running for s in slots), timeout=timeout)
        return [self.agents[s].state().exit_code for s in slots]

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.steps.read_text().splitlines()]

    def log(self, slot: int, attempt: int) -> str:
        return (self.workdir / f"slot-{slot}" / f"attempt-{attempt}.log").read_text()

    def close(self) -> None:
        for agent in self.agents:
            agent.kill()
        self.store.close()


def _answers(agent: AgentProcess) -> bool:
    try:
        agent.state()
    except Exception:
        return False
    return True


def _until(condition: Any, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_stdlib_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def config(corpus: dict[str, Path]) -> dict[str, Any]:
    config = run_config(
        corpus,
        stages=[stage(budget={"steps": STEPS}, zeroStage=1)],
        checkpoint={"intervalSteps": 100, "memoryIntervalSteps": MEMORY_INTERVAL, "keep": 2},
    )
    config["model"].update(hidden=128, seqLen=128)  # slow enough to lose a worker mid-run
    return config


@pytest.fixture
def workers(tmp_path: Path, config: dict[str, Any]) -> Iterator[Workers]:
    started = Workers(tmp_path / "stormy", config, slots=3)
    yield started
    started.close()


def _restored_from(log: str) -> str:
    """The tier the attempt restored from, as its log says."""
    found = re.search(r"restored everything from \S+ \((\w+)\)", log)
    assert found is not None, log[-2000:]
    return found[1]


def _losses(records: list[dict[str, Any]], attempt: int) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if r["attempt"] == attempt}


def _lose_worker_0(workers: Workers, *, after_step: int) -> int:
    """Kill slot 0's agent tree (rank 0 of attempt 1) and its memory once ``after_step`` is
    logged; returns the last step attempt 1 logged."""
    _until(lambda: workers.steps.exists() and len(workers.records()) >= after_step, timeout=300)
    workers.agents[0].kill()
    assert not workers.agents[0].memory.exists()
    assert workers.finished([1]) != [0]  # the survivor's group broke
    return max(r["step"] for r in workers.records() if r["attempt"] == 1)


@pytest.fixture
def calm(tmp_path: Path, config: dict[str, Any]) -> dict[int, float]:
    """The uninterrupted run at world size 2."""
    run = Workers(tmp_path / "calm", config, slots=2)
    try:
        run.order(1, [0, 1])
        assert run.finished([0, 1]) == [0, 0]
        return _losses(run.records(), 1)
    finally:
        run.close()


def test_a_warm_spare_takes_a_lost_workers_place_from_memory_bitwise(
    workers: Workers, calm: dict[int, float]
) -> None:
    workers.order(1, [0, 1])
    last = _lose_worker_0(workers, after_step=9)
    workers.order(2, [1, 2])  # the survivor and the spare: world size 2 again
    assert workers.finished([1, 2]) == [0, 0]
    assert _restored_from(workers.log(1, 2)) == "memory"
    resumed = _losses(workers.records(), 2)
    first = min(resumed)
    assert last - (first - 1) <= MEMORY_INTERVAL  # steps lost to the worker
    for step, loss in resumed.items():
        assert loss == calm[step], step  # bitwise, as if nothing had happened


def test_the_survivor_alone_restores_its_lost_neighbours_shard_from_memory(
    workers: Workers, calm: dict[int, float]
) -> None:
    workers.order(1, [0, 1])
    last = _lose_worker_0(workers, after_step=9)
    workers.order(2, [1])  # world size 1: the snapshot is resharded from memory
    assert workers.finished([1]) == [0]
    log = workers.log(1, 2)
    assert _restored_from(log) == "memory"
    assert "universal format" in log
    resumed = _losses(workers.records(), 2)
    first = min(resumed)
    assert last - (first - 1) <= MEMORY_INTERVAL
    for step, loss in resumed.items():
        assert loss == pytest.approx(calm[step], abs=1e-5), step
