"""Draw the "PretrainJob overview" dashboard, panel by panel, from a real run: a local run of
the tiny job (a worker lost and back), scraped by a real Prometheus, each panel's own query
evaluated over the run and plotted with matplotlib into docs/overview.png.

    .venv/bin/python docs/render_overview.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain_operator.local.runner import run
from pretrain_operator.manifests import load_job
from pretrain_trainer.data import build_stdlib_corpus

from tests.observability.test_prometheus import _kill_and_return
from tests.support.prom import Prometheus, free_ports

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "overview.png"


def _legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or (
        labels.get("stage", "")
    )


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads((ROOT / "dashboards" / "pretrainjob-overview.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        build_stdlib_corpus(run_dir / "data")
        with Prometheus(Path(tmp) / "prometheus", targets=free_ports(3)) as prometheus:
            stop = threading.Event()
            chaos = threading.Thread(target=_kill_and_return, args=(run_dir, stop))
            chaos.start()
            started = time.time()
            try:
                run(
                    load_job(ROOT / "examples" / "tiny-cpu.yaml"),
                    run_dir,
                    workers=2,
                    metrics_port=prometheus.targets[0],
                )
            finally:
                stop.set()
                chaos.join()
            ended = time.time()
            time.sleep(2)
            results: list[tuple[dict[str, Any], list[tuple[str, list[Any]]]]] = []
            for panel in panels:
                lines = []
                for target in panel.get("targets", []):
                    expr = target["expr"].replace("$namespace", "local").replace("$job", "tiny-cpu")
                    for series in prometheus.series(expr, started, ended):
                        label = _legend(target.get("legendFormat", ""), series["metric"])
                        lines.append((label, series["values"]))
                results.append((panel, lines))
    columns = 3
    rows = -(-len(results) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(18, 3.2 * rows))
    for ax, (panel, lines) in zip(axes.flat, results, strict=False):
        for label, values in lines:
            xs, ys, last = [], [], None
            for t, v in values:
                if last is not None and float(t) - last > 3:  # no data in between: a gap
                    xs.append(float("nan"))
                    ys.append(float("nan"))
                xs.append((float(t) - started) / 60)
                ys.append(float(v))
                last = float(t)
            ax.plot(xs, ys, label=label or None, linewidth=1.2)
        ax.set_title(panel["title"], fontsize=10)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("minutes", fontsize=7)
        if any(label for label, _ in lines):
            ax.legend(fontsize=6, loc="best")
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    figure.suptitle(
        "PretrainJob overview: tiny-cpu, 2 workers, worker 0 lost and back", fontsize=13
    )
    figure.tight_layout()
    figure.savefig(OUT, dpi=80)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
