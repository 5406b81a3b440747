"""Recovery time: from killing a worker to the first training step completed after the
restore, split into its phases, for the tiny model and a ~100M-parameter model.

    .venv/bin/python bench/recovery.py [--model tiny|100M]

Runs a two-worker job with `pretrainctl run`'s runner, kills the worker that hosts rank 0 (its
whole process tree, like a lost node) once a checkpoint exists, and reads the timestamps of
the runner's events and the trainers' logs:

    detection   kill -> the planner sees the loss          (goal with rendezvous: <= 10 s)
    back-off    the configured restart back-off (0 here)
    rendezvous  new attempt started -> process group up, DeepSpeed initialised
                (process start, torch/DeepSpeed import, rendezvous at the store, initialize)
    restore     verify + load of the newest checkpoint (and universal conversion: the group
                continues at world size 1)
    first step  the first optimizer step after the restore
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

from pretrain_operator.api import parse_job
from pretrain_operator.local.backend import read_capacity, write_capacity
from pretrain_operator.local.runner import Update, run
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
            "data": {"sources": [{"name": "code", "path": "data/code"},
                                 {"name": "prose", "path": "data/prose"}]},
            "elastic": {"minWorkers": 1, "maxWorkers": 2, "restartBackoffSeconds": 0,
                        "scaleUpCooldownSeconds": 86400},
            "checkpoint": {"intervalSteps": 4, "keep": 2},
            "trainer": {"logEverySteps": 1000},
            "stages": [{"name": "bench", "budget": {"steps": steps},
                        "dataMix": {"code": 1, "prose": 1}, "globalBatchSize": 4,
                        "microBatchSize": 1, "precision": "fp32", "zeroStage": 1}],
        },
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    job = parse_job(_job(args.model, args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        build_stdlib_corpus(run_dir / "data", max_files=300)
        events: list[tuple[float, str]] = []
        killed: list[float] = []

        def on_update(update: Update) -> None:
            events.extend((time.time(), e.reason) for e in update.events)

        def chaos() -> None:
            latest = run_dir / "checkpoints" / "recovery" / "latest"
            while not latest.exists():
                time.sleep(0.05)
            capacity, down = read_capacity(run_dir)
            write_capacity(run_dir, capacity, down | {0})
            killed.append(time.time())

        threading.Thread(target=chaos, daemon=True).start()
        status = run(job, run_dir, workers=2, on_update=on_update)
        assert status.phase == "Succeeded", status.conditions
        t_kill = killed[0]
        t_seen = next(t for t, reason in events if t >= t_kill and reason == "WorkerLost")
        t_start = next(t for t, reason in events if t >= t_seen and reason == "Restarted")
        records = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
        first = next(r for r in records if r["time"] > t_start)
        log = (run_dir / "workers" / "1" / f"attempt-{status.attempt}.log").read_text()
        restore = float(re.findall(r"restored everything from .*? in ([0-9.]+)s", log)[-1])
        total = first["time"] - t_kill
        rendezvous = first["time"] - first["seconds"] - restore - t_start
        print(
            f"model {args.model}: {job.spec.model.num_params() / 1e6:.1f}M params, "
            f"2 workers -> 1 (ZeRO-1 fp32), 2 CPU cores"
        )
        for name, seconds in (("detection", t_seen - t_kill), ("back-off", t_start - t_seen),
                              ("rendezvous + start", rendezvous), ("restore", restore),
                              ("first step", first["seconds"])):  # fmt: skip
            print(f"  {name:20} {seconds:7.2f} s")
        print(
            f"  {'total':20} {total:7.2f} s   (detection + rendezvous + start: "
            f"{t_seen - t_kill + rendezvous:.2f} s; goal <= 10 s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
