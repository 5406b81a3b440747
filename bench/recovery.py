"""Recovery time: from killing a worker to the first training step completed after the
restore, split into its phases, for the tiny model and a ~100M-parameter model, along the
project's path and torchrun's own.

    .venv/bin/python bench/recovery.py [--model tiny|100M] [--path attempts|membership|both]
                                       [--spare]

A two-worker job; once a checkpoint exists, the worker that hosts rank 0 is killed (its whole
process tree and its memory, like a lost node) and the survivor goes on at world size 1, or,
with ``--spare``, the survivor and a warm standby go on at world size 2.

attempts (what the local backend and the operator do): each slot's long-lived worker agent
holds torch and DeepSpeed imported and the slot's in-memory checkpoint tier (with a copy of
its neighbour's); the planner sees the loss, picks the new world size and orders a new attempt
from the survivors' agents, which fork trainers that restore from memory.

membership (torchrun's own elasticity, the baseline: new processes, restore from storage):
agents run ``--nnodes=1:2 --max-restarts=3`` under one rendezvous id with keep-alive tuned as
far as it stays stable (interval 1 s, 3 misses, last call 1 s); the surviving agent restarts
its workers in a new rendezvous round, which import everything again and read the checkpoint
from storage.

Phases, from timestamps in the runner's events and the trainers' logs:

    detection   kill -> the planner sees the loss (attempts only)  (goal with rendezvous: <= 10 s)
    back-off    the configured restart back-off (0 here; attempts only)
    rendezvous  -> process group up, DeepSpeed initialised (process start, torch/DeepSpeed
                import, rendezvous at the store, initialize); for membership this also holds
                the detection, which happens inside the agent
    restore     verify + load of the newest checkpoint (and the universal conversion: the
                group continues at world size 1)
    first step  the first optimizer step after the restore

The attempts path also prints the job's own split of the same recovery
(``status.lastRecovery``: detect, backoff, schedule, start, rendezvous, init, restore,
first_step), which counts from when the loss was noticed and splits the start finer.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pretrain_operator.api import PretrainJob, RecoveryStatus, parse_job
from pretrain_operator.local.backend import (
    read_capacity,
    torchrun_command,
    worker_env,
    write_capacity,
)
from pretrain_operator.local.processes import signal_tree
from pretrain_operator.local.runner import Update, prepare, run
from pretrain_operator.local.store import StoreProcess
from pretrain_trainer.data import build_stdlib_corpus

MODELS = {
    "tiny": {"layers": 2, "hidden": 64, "heads": 4, "vocabSize": 256, "seqLen": 128},
    "100M": {"layers": 12, "hidden": 768, "heads": 12, "vocabSize": 32768, "seqLen": 128},
}


def _job(model: str, steps: int) -> dict[str, object]:
    return {
        "apiVersion": "pretrain.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": {"name": "recovery"},
        "spec": {
            "image": "pretrain-trainer:bench",
            "model": MODELS[model],
            "data": {
                "sources": [
                    {"name": "code", "path": "data/code"},
                    {"name": "prose", "path": "data/prose"},
                ]
            },
            "elastic": {
                "minWorkers": 1,
                "maxWorkers": 2,
                "restartBackoffSeconds": 0,
                "scaleUpCooldownSeconds": 86400,
            },
            "checkpoint": {"intervalSteps": 4, "memoryIntervalSteps": 2, "keep": 2},
            "trainer": {"logEverySteps": 1000},
            "stages": [
                {
                    "name": "bench",
                    "budget": {"steps": steps},
                    "dataMix": {"code": 1, "prose": 1},
                    "globalBatchSize": 4,
                    "microBatchSize": 1,
                    "precision": "fp32",
                    "zeroStage": 1,
                }
            ],
        },
    }


Phases = dict[str, float]
MEMBERSHIP_CONF = ",keep_alive_interval=1,keep_alive_max_attempt=3,last_call_timeout=1"


REPORTED: dict[str, RecoveryStatus | None] = {}
"""The job's own account of the recovery (``status.lastRecovery``), where the path has one."""


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "recovery" / "latest"


def _after_restore(run_dir: Path, log: Path, since: float) -> tuple[float, float, float]:
    """(time the first step after ``since`` finished, its duration, the restore's duration)."""
    records = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["time"] > since)
    restore = float(re.findall(r"restored everything from .*? in ([0-9.]+)s", log.read_text())[-1])
    return first["time"], first["seconds"], restore


SPARE = [False]  # --spare: a third slot holds a warm agent, and the group stays at 2


def attempts(job: PretrainJob, run_dir: Path) -> Phases:
    events: list[tuple[float, str]] = []
    killed: list[float] = []

    def on_update(update: Update) -> None:
        events.extend((time.time(), e.reason) for e in update.events)

    def chaos() -> None:
        while not _latest(run_dir).exists():
            time.sleep(0.05)
        capacity, down = read_capacity(run_dir)
        write_capacity(run_dir, capacity, down | {0})
        killed.append(time.time())

    threading.Thread(target=chaos, daemon=True).start()
    status = run(job, run_dir, workers=3 if SPARE[0] else 2, on_update=on_update)
    assert status.phase == "Succeeded", status.conditions
    REPORTED["attempts"] = status.last_recovery
    t_kill = killed[0]
    t_seen = next(t for t, reason in events if t >= t_kill and reason == "WorkerLost")
    t_start = next(t for t, reason in events if t >= t_seen and reason == "Restarted")
    log = next(  # the new attempt's rank 0 logs the restore
        path
        for slot in (1, 2)
        if (path := run_dir / "workers" / str(slot) / f"attempt-{status.attempt}.log").exists()
        and "restored everything" in path.read_text()
    )
    t_first, first, restore = _after_restore(run_dir, log, t_start)
    return {
        "detection": t_seen - t_kill,
        "back-off": t_start - t_seen,
        "rendezvous + start": t_first - first - restore - t_start,
        "restore": restore,
        "first step": first,
        "total": t_first - t_kill,
    }


def membership(job: PretrainJob, run_dir: Path) -> Phases:
    prepare(job, run_dir, workers=2)
    agents: list[subprocess.Popen[bytes]] = []
    with StoreProcess() as store:
        try:
            for slot in (0, 1):
                folder = run_dir / "workers" / str(slot)
                folder.mkdir(parents=True, exist_ok=True)
                env = worker_env(job, run_dir, stage=0, attempt=1, report=folder / "report.json")
                env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # else scale-up fails
                command = torchrun_command(
                    job,
                    store_port=store.port,
                    rdzv_id="recovery-elastic",
                    nnodes="1:2",
                    rdzv_conf=MEMBERSHIP_CONF,
                    max_restarts=3,
                )
                with (folder / "agent.log").open("ab") as log:
                    agents.append(
                        subprocess.Popen(
                            command,
                            env=env,
                            cwd=run_dir,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            while not _latest(run_dir).exists():
                time.sleep(0.05)
            logs = [run_dir / "workers" / str(slot) / "agent.log" for slot in (0, 1)]
            if "world size 2" not in "".join(log.read_text() for log in logs):
                raise SystemExit("the agents did not form one group of 2: rerun")
            signal_tree(agents[0].pid, signal.SIGKILL)
            t_kill = time.time()
            agents[0].wait()
            code = agents[1].wait(timeout=3600)
            assert code == 0, logs[1].read_text()[-3000:]
        finally:
            for agent in agents:
                if agent.poll() is None:
                    signal_tree(agent.pid, signal.SIGKILL)
                    agent.wait()
    t_first, first, restore = _after_restore(run_dir, logs[1], t_kill)
    return {
        "detection": float("nan"),
        "back-off": float("nan"),
        "rendezvous + start": t_first - first - restore - t_kill,
        "restore": restore,
        "first step": first,
        "total": t_first - t_kill,
    }


PATHS = {"attempts": attempts, "membership": membership}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--path", choices=[*PATHS, "both"], default="both")
    parser.add_argument(
        "--spare", action="store_true", help="attempts: a warm spare slot; the group stays at 2"
    )
    args = parser.parse_args()
    SPARE[0] = args.spare
    job = parse_job(_job(args.model, args.steps))
    chosen = list(PATHS) if args.path == "both" else [args.path]
    results: dict[str, Phases] = {}
    for name in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            build_stdlib_corpus(run_dir / "data", max_files=300)
            results[name] = PATHS[name](job, run_dir)
    after = "2 (a warm spare takes the lost worker's place)" if args.spare else "1"
    print(
        f"model {args.model}: {job.spec.model.num_params() / 1e6:.1f}M params, "
        f"2 workers -> {after} (ZeRO-1 fp32), 2 CPU cores"
    )
    print(f"  {'phase':20}" + "".join(f"{name:>12}" for name in results))
    for phase in next(iter(results.values())):
        cells = "".join(
            f"{'-':>12}" if seconds != seconds else f"{seconds:10.2f} s"
            for seconds in (r[phase] for r in results.values())
        )
        print(f"  {phase:20}{cells}")
    if len(results) == 2:
        a, m = results["attempts"], results["membership"]
        to_train = {k: v["total"] - v["restore"] - v["first step"] for k, v in results.items()}
        print(
            f"  kill -> group training again (without restore and first step): attempts "
            f"{to_train['attempts']:.2f} s, membership {to_train['membership']:.2f} s; "
            f"total ratio attempts (agents, memory tier) / membership (new processes, storage) "
            f"= {a['total'] / m['total']:.2f}"
        )
    else:
        phases = next(iter(results.values()))
        print(f"  total {phases['total']:.2f} s")
    reported = REPORTED.get("attempts")
    if reported is not None:  # the same recovery, as the job's status splits it
        split = ", ".join(f"{k} {v:.2f}" for k, v in reported.phases.model_dump().items())
        print(f"  status.lastRecovery (attempts): {split}; total {reported.total_seconds:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
