"""The trainer's usage, the input of goodput on both backends, says the same through each of
its outlets: the step log a local run folds, the ``/metrics`` rank 0 serves on a cluster, and
the usage a finished stage's report carries."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pretrain_operator.kube.progress import parse
from pretrain_operator.local.journal import StepLog
from pretrain_trainer import contract
from pretrain_trainer.data import build_stdlib_corpus

from tests.trainer.harness import run_config, stage

pytestmark = pytest.mark.slow

# 13 steps of a 20-step stage with a checkpoint every 5, each save waited for: the checkpoint
# of step 10 is durable, and the step log has said so (on step 11).
TRAIN_13_STEPS = """
import os, sys
from prometheus_client import generate_latest
from pretrain_trainer.contract import TrainerEnv
from pretrain_trainer.main import load_run_config, setup

env = TrainerEnv.from_environ(os.environ)
trainer = setup(env, load_run_config(env.run_config))
for _ in range(13):
    trainer.train_step()
    if trainer.save(force=False) is not None:
        trainer.checkpoints.wait()
with open(sys.argv[1], "wb") as out:
    out.write(generate_latest(trainer.metrics.registry))
with open(sys.argv[2], "w") as out:
    out.write(trainer.usage().to_json())
"""


def test_the_step_log_and_the_metrics_report_the_same_usage(tmp_path: Path) -> None:
    corpus = build_stdlib_corpus(tmp_path / "corpus")
    config = run_config(corpus, stages=[stage(budget={"steps": 20})])
    config["checkpoint"] = {"intervalSteps": 5}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    environ = {
        **os.environ,
        contract.ENV_JOB: "usage",
        contract.ENV_STAGE: "0",
        contract.ENV_ATTEMPT: "3",
        contract.ENV_RUN_CONFIG: str(tmp_path / "run.yaml"),
        contract.ENV_CHECKPOINT_ROOT: str(tmp_path / "checkpoints"),
        contract.ENV_STEP_LOG: str(tmp_path / "steps.jsonl"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            TRAIN_13_STEPS,
            str(tmp_path / "metrics.txt"),
            str(tmp_path / "usage.json"),
        ],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    progress = parse((tmp_path / "metrics.txt").read_text())
    assert progress is not None
    scraped = progress.usage
    log = StepLog(tmp_path / "steps.jsonl")
    log.poll()
    folded = log.usage.usage
    assert scraped is not None
    assert folded is not None
    exact = ("attempt", "resumed_step", "step", "steps", "checkpoint_step")
    assert {f: getattr(scraped, f) for f in exact} == {f: getattr(folded, f) for f in exact}
    assert (scraped.attempt, scraped.step, scraped.checkpoint_step) == (3, 13, 10)
    for seconds in ("step_seconds", "blocking_seconds", "checkpoint_step_seconds"):
        assert getattr(scraped, seconds) == pytest.approx(getattr(folded, seconds), abs=1e-6)
    assert 0 < scraped.checkpoint_step_seconds < scraped.step_seconds
    reported = contract.Usage.parse((tmp_path / "usage.json").read_text())
    assert reported is not None
    assert {f: getattr(reported, f) for f in exact} == {f: getattr(scraped, f) for f in exact}
    for field in ("step_seconds", "checkpoint_step_seconds", "launcher_time", "restored_time"):
        assert getattr(reported, field) == pytest.approx(getattr(scraped, field), abs=1e-6)
    moments = ("launcher_time", "group_time", "engine_time", "restored_time")
    assert [getattr(scraped, m) for m in moments] == [getattr(folded, m) for m in moments]
    times = [getattr(scraped, m) for m in moments]
    assert times == sorted(times)
    # Taken a moment apart (the metric at the step's end, the record as it is written).
    assert scraped.first_step_time == pytest.approx(folded.first_step_time, abs=0.05)
    assert scraped.last_step_time == pytest.approx(folded.last_step_time, abs=0.05)
