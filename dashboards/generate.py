"""The Grafana dashboards, as code (Grafana's own foundation SDK), written as JSON next to this
file. The JSON is what the Helm chart packages and what Grafana imports; a test checks it is
what this script writes, and another evaluates every panel's query against a real Prometheus.

    .venv/bin/python dashboards/generate.py [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import common, prometheus, stat, timeseries
from grafana_foundation_sdk.builders import dashboard as board
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import (
    BigValueColorMode,
    BigValueGraphMode,
    LegendDisplayMode,
    LegendPlacement,
    StackingMode,
)
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

HERE = Path(__file__).resolve().parent
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'namespace="$namespace", job="$job"'


def _query(expr: str, legend: str = "") -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DATASOURCE)
    return query.legend_format(legend) if legend else query


def _series(
    title: str,
    *queries: prometheus.Dataquery,
    unit: str = "",
    width: int = 8,
    stacked: bool = False,
    description: str = "",
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .height(8)
        .span(width)
        .legend(
            common.VizLegendOptions()
            .display_mode(LegendDisplayMode.LIST)
            .placement(LegendPlacement.BOTTOM)
            .show_legend(True)
        )
    )
    if description:
        panel = panel.description(description)
    if unit:
        panel = panel.unit(unit)
    if stacked:
        panel = panel.stacking(common.StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40)
    for i, query in enumerate(queries):
        panel = panel.with_target(query.ref_id(chr(ord("A") + i)))
    return panel


def _stat(title: str, query: prometheus.Dataquery, *, unit: str = "", width: int = 4) -> stat.Panel:
    panel = (
        stat.Panel()
        .title(title)
        .datasource(DATASOURCE)
        .height(4)
        .span(width)
        .graph_mode(BigValueGraphMode.AREA)
        .color_mode(BigValueColorMode.VALUE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]))
    )
    panel = panel.with_target(query.ref_id("A"))
    return panel.unit(unit) if unit else panel


def _variables(dash: board.Dashboard, *, job: bool) -> board.Dashboard:
    dash = dash.with_variable(
        board.DatasourceVariable("datasource").label("Data source").type("prometheus")
    )
    namespace = (
        board.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query("label_values(pretrainjob_phase, namespace)")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    dash = dash.with_variable(namespace)
    if job:
        dash = dash.with_variable(
            board.QueryVariable("job")
            .label("Job")
            .datasource(DATASOURCE)
            .query('label_values(pretrainjob_phase{namespace="$namespace"}, job)')
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        )
    return dash


def _quantiles(metric: str, window: str = "5m") -> list[prometheus.Dataquery]:
    return [
        _query(
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{JOB}}}[{window}])))",
            f"p{int(q * 100)}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


def overview() -> board.Dashboard:
    dash = (
        board.Dashboard("PretrainJob overview")
        .uid("pretrainjob-overview")
        .tags(["pretraining", "pretrainjob"])
        .refresh("30s")
        .time("now-6h", "now")
        .description("One PretrainJob: progress, learning, throughput and resilience.")
    )
    dash = _variables(dash, job=True)
    dash = dash.with_row(board.Row("Progress"))
    dash = dash.with_panel(_stat("Stage", _query(f"pretrainjob_stage_index{{{JOB}}}")))
    dash = dash.with_panel(_stat("Step", _query(f"max(pretrainjob_step{{{JOB}}})")))
    dash = dash.with_panel(
        _stat("Tokens (stage)", _query(f"max(pretrainjob_stage_tokens{{{JOB}}})"), unit="short")
    )
    dash = dash.with_panel(
        _stat("Stage ETA", _query(f"pretrainjob_stage_eta_seconds{{{JOB}}}"), unit="s")
    )
    dash = dash.with_panel(
        _stat("Workers ready", _query(f'pretrainjob_workers{{{JOB}, state="ready"}}'))
    )
    dash = dash.with_panel(
        _stat("Goodput", _query(f"pretrainjob_goodput_ratio{{{JOB}}}"), unit="percentunit")
    )
    dash = dash.with_row(board.Row("Learning"))
    dash = dash.with_panel(
        _series("Loss by stage", _query(f"max by (stage) (pretrainjob_loss{{{JOB}}})", "{{stage}}"))
    )
    dash = dash.with_panel(
        _series(
            "Held-out loss by stage and source",
            _query(
                f"max by (stage, source) (pretrainjob_eval_loss{{{JOB}}})", "{{stage}} {{source}}"
            ),
        )
    )
    dash = dash.with_panel(
        _series(
            "Held-out perplexity",
            _query(
                f"max by (stage, source) (pretrainjob_eval_perplexity{{{JOB}}})",
                "{{stage}} {{source}}",
            ),
        )
    )
    dash = dash.with_panel(
        _series(
            "Learning rate",
            _query(f"max by (stage) (pretrainjob_learning_rate{{{JOB}}})", "{{stage}}"),
        )
    )
    dash = dash.with_panel(
        _series(
            "Gradient norm and skipped steps",
            _query(f"max by (stage) (pretrainjob_grad_norm{{{JOB}}})", "grad norm {{stage}}"),
            _query(
                f"sum(increase(pretrainjob_skipped_steps_total{{{JOB}}}[15m]))", "skipped in 15m"
            ),
        )
    )
    dash = dash.with_row(board.Row("Throughput"))
    dash = dash.with_panel(
        _series(
            "Tokens per second",
            _query(f"max by (stage) (pretrainjob_tokens_per_second{{{JOB}}})", "{{stage}}"),
            unit="short",
        )
    )
    dash = dash.with_panel(
        _series("Step time", *_quantiles("pretrainjob_step_seconds", "2m"), unit="s")
    )
    dash = dash.with_panel(
        _series(
            "World size",
            _query(f"max(pretrainjob_world_size{{{JOB}}})", "trainer processes"),
            _query(f"pretrainjob_workers{{{JOB}}}", "workers {{state}}"),
        )
    )
    dash = dash.with_row(board.Row("Resilience"))
    dash = dash.with_panel(
        _series("Restarts by reason", _query(f"pretrainjob_restarts_total{{{JOB}}}", "{{reason}}"))
    )
    dash = dash.with_panel(
        _series(
            "Recovery time (loss to first step)",
            _query(
                f"pretrainjob_recovery_seconds_sum{{{JOB}}} / "
                f"pretrainjob_recovery_seconds_count{{{JOB}}}",
                "mean",
            ),
            unit="s",
        )
    )
    dash = dash.with_panel(
        _series(
            "Goodput",
            _query(f"pretrainjob_goodput_ratio{{{JOB}}}", "goodput"),
            _query(f"pretrainjob:step_time_ratio:rate5m{{{JOB}}}", "in training steps, 5m"),
            unit="percentunit",
            description="The control plane's goodput since the job started (steps whose result "
            "survived, over wall time; on a cluster and locally alike), and the share of the "
            "last 5 minutes the trainers spent inside steps (redone steps included).",
        )
    )
    dash = dash.with_panel(
        _series(
            "Recovery phases (last recovery)",
            _query(f"pretrainjob_last_recovery_phase_seconds{{{JOB}}}", "{{phase}}"),
            unit="s",
            stacked=True,
            description="Where the last recovery's time went, from the worker's loss to the "
            "first step after it: detect, backoff, schedule, start, rendezvous, init, restore, "
            "first_step (status.lastRecovery). Each recovery is a new stack.",
        )
    )
    dash = dash.with_panel(
        _series(
            "Recovery phases (mean over all)",
            _query(
                f"pretrainjob_recovery_phase_seconds_sum{{{JOB}}} / "
                f"pretrainjob_recovery_phase_seconds_count{{{JOB}}}",
                "{{phase}}",
            ),
            unit="s",
            stacked=True,
        )
    )
    dash = dash.with_panel(
        _series(
            "Badput by reason",
            _query(f"pretrainjob_badput_seconds_total{{{JOB}}}", "{{reason}}"),
            unit="s",
            stacked=True,
            description="Wall time lost, by reason; goodput is the share that trained.",
        )
    )
    dash = dash.with_panel(
        _series(
            "Checkpoint save (total)",
            *_quantiles("pretrainjob_checkpoint_save_seconds", "15m"),
            unit="s",
        )
    )
    dash = dash.with_panel(
        _series(
            "Checkpoint blocking and restore",
            *_quantiles("pretrainjob_checkpoint_save_blocking_seconds", "15m"),
            _query(f"max(pretrainjob_checkpoint_restore_seconds{{{JOB}}})", "last restore"),
            unit="s",
        )
    )
    dash = dash.with_panel(
        _series(
            "Checkpoint age",
            _query(
                f"time() - (max(pretrainjob_last_checkpoint_timestamp_seconds{{{JOB}}}) > 0)", "age"
            ),
            _query(
                f"max(pretrainjob_step{{{JOB}}}) - max(pretrainjob_last_checkpoint_step{{{JOB}}})",
                "steps since",
            ),
            _query(f"pretrainjob_newest_checkpoint_age_seconds{{{JOB}}}", "age (job status)"),
            unit="s",
        )
    )
    return dash


def operator_health() -> board.Dashboard:
    dash = (
        board.Dashboard("PretrainJob operator health")
        .uid("pretrainjob-operator")
        .tags(["pretraining", "pretrainjob", "operator"])
        .refresh("30s")
        .time("now-6h", "now")
        .description("The control loop: reconcile latency, errors and jobs by phase.")
    )
    dash = _variables(dash, job=False)
    reconcile = "pretrainjob_reconcile_seconds_bucket"
    dash = dash.with_panel(
        _series(
            "Reconcile latency",
            *[
                _query(
                    f"histogram_quantile({q}, sum by (le) (rate({reconcile}[5m])))",
                    f"p{int(q * 100)}",
                )
                for q in (0.5, 0.9, 0.99)
            ],
            unit="s",
            width=12,
        )
    )
    dash = dash.with_panel(
        _series(
            "Reconcile errors",
            _query("sum by (kind) (rate(pretrainjob_reconcile_errors_total[5m]))", "{{kind}}"),
            unit="ops",
            width=12,
        )
    )
    dash = dash.with_panel(
        _series(
            "Jobs by phase",
            _query('sum by (phase) (pretrainjob_phase{namespace=~"$namespace"})', "{{phase}}"),
            width=12,
            stacked=True,
        )
    )
    dash = dash.with_panel(
        _series(
            "Restarts in the last hour, by reason",
            _query(
                "sum by (reason) "
                '(increase(pretrainjob_restarts_total{namespace=~"$namespace"}[1h]))',
                "{{reason}}",
            ),
            width=12,
        )
    )
    return dash


DASHBOARDS = {"pretrainjob-overview.json": overview, "operator-health.json": operator_health}


def render(name: str) -> str:
    built = DASHBOARDS[name]().build()
    return json.dumps(json.loads(JSONEncoder().encode(built)), indent=2, sort_keys=True) + "\n"


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target of an exported dashboard."""
    return [
        (panel.get("title", ""), target["expr"])
        for panel in dashboard.get("panels", [])
        for target in panel.get("targets", [])
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args()
    stale = []
    for name in DASHBOARDS:
        text, path = render(name), HERE / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
