"""A real Prometheus scrapes a local run of the tiny job (the runner's series and each worker's
trainer) while a worker is lost and comes back; then every dashboard panel's query returns
data over the run, every alert rule evaluates, and goodput makes sense against the run's logs."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pretrain_operator.local.backend import read_capacity, write_capacity
from pretrain_operator.local.runner import run
from pretrain_operator.manifests import load_job
from pretrain_operator.telemetry.goodput import goodput as accounted_goodput
from pretrain_trainer.data import build_stdlib_corpus

from tests.conftest import ROOT
from tests.support.prom import Prometheus, free_ports

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]
DASHBOARDS = ["pretrainjob-overview.json", "operator-health.json"]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus on a free port, scraping the ports a run will serve on, every second."""
    with Prometheus(tmp_path / "prometheus", targets=free_ports(3)) as server:
        yield server


def _kill_and_return(run_dir: Path, stop: threading.Event) -> None:
    """Take worker slot 0 away once stage 0 has a checkpoint, and give it back later."""
    latest = run_dir / "checkpoints" / "tiny-cpu" / "latest"
    for action, condition in (("kill", latest.exists), ("add", lambda: _step(run_dir) >= 70)):
        while not stop.is_set() and not condition():
            time.sleep(0.05)
        capacity, down = read_capacity(run_dir)
        write_capacity(run_dir, capacity, down | {0} if action == "kill" else down - {0})


def _step(run_dir: Path) -> int:
    try:
        last = json.loads((run_dir / "steps.jsonl").read_text().splitlines()[-1])
        return int(last["step"]) if last["stage"] == 0 else 10**6
    except (OSError, ValueError, IndexError):
        return 0


def test_prometheus_sees_every_panel_and_alert_and_goodput_matches_the_run(
    tmp_path: Path, prometheus: Prometheus
) -> None:
    metrics_port = prometheus.targets[0]
    run_dir = tmp_path / "run"
    build_stdlib_corpus(run_dir / "data")
    stop = threading.Event()
    chaos = threading.Thread(target=_kill_and_return, args=(run_dir, stop))
    chaos.start()
    started = time.time()
    try:
        status = run(
            load_job(ROOT / "examples" / "tiny-cpu.yaml"),
            run_dir,
            workers=2,
            metrics_port=metrics_port,
        )
    finally:
        stop.set()
        chaos.join()
    ended = time.time()
    assert status.phase == "Succeeded"
    time.sleep(2)  # the last scrapes and rule evaluations

    empty = []
    for name in DASHBOARDS:
        dashboard = json.loads((ROOT / "dashboards" / name).read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$namespace", "local").replace("$job", "tiny-cpu")
                if not prometheus.values(expr, started, ended):
                    empty.append(f"{name}: {panel['title']}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)

    rules = yaml.safe_load((ROOT / "alerts" / "pretrainjob-rules.yaml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        prometheus.values(rule["expr"], started, ended)  # evaluates (may be empty: no alert)
    groups = prometheus.api("rules")["groups"]
    health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
    assert health == dict.fromkeys(health, "ok")
    assert len(health) == 8  # 7 alerts and the recording rule

    # Goodput (from the status, as on a cluster), against the run's own step log.
    goodput = accounted_goodput(status, now=ended)
    assert goodput is not None
    assert 0 < goodput.ratio < 1
    assert goodput.badput["restart"] > 0
    assert goodput.badput["restore"] > 0
    records = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
    kept = {(r["stage"], r["step"]): r["seconds"] for r in records}  # the last run of each
    assert goodput.productive == pytest.approx(sum(kept.values()), rel=0.05)
    restored = sum(r.get("restoreSeconds", 0.0) for r in records)
    assert goodput.badput["restore"] == pytest.approx(restored, rel=0.05)
    evaluating = sum(r.get("evalSeconds") or 0.0 for r in records)
    assert evaluating > 0
    assert goodput.badput["evaluation"] == pytest.approx(evaluating, rel=0.05)
    assert goodput.productive + sum(goodput.badput.values()) == pytest.approx(goodput.wall)
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    lost = next(e["time"] for e in events if e["reason"] == "WorkerLost")
    back = next(e["time"] for e in events if e["reason"] == "Restarted" and e["time"] > lost)
    first = next(r["time"] for r in records if r["time"] > back)
    assert status.last_recovery is not None
    assert status.last_recovery.total_seconds == pytest.approx(first - lost, abs=0.05)
    scraped = prometheus.values('pretrainjob_goodput_ratio{job="tiny-cpu"}', started, ended)
    assert scraped[-1] == pytest.approx(goodput.ratio, abs=0.1)  # scraped a moment before
    recovered = prometheus.values(
        'pretrainjob_recovery_seconds_count{job="tiny-cpu"}', started, ended
    )
    assert max(recovered) >= 1
