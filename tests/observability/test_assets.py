"""The committed dashboards and alert rules: generated, importable, valid, consistent."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

DASHBOARDS = ROOT / "dashboards"
RULES = ROOT / "alerts" / "pretrainjob-rules.yaml"


def test_committed_dashboards_are_what_the_generator_writes() -> None:
    done = subprocess.run(
        [sys.executable, str(DASHBOARDS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["pretrainjob-overview.json", "operator-health.json"])
def test_dashboards_are_importable_with_datasource_and_job_variables(name: str) -> None:
    dashboard = json.loads((DASHBOARDS / name).read_text())
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "namespace" in variables
    if name == "pretrainjob-overview.json":
        assert variables["job"]["query"].startswith("label_values(pretrainjob_phase")
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets, "panels without queries"
    for panel in dashboard["panels"]:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(refs), panel["title"]
        for target in panel.get("targets", []):
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_overview_has_the_four_rows_users_look_for() -> None:
    dashboard = json.loads((DASHBOARDS / "pretrainjob-overview.json").read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Progress", "Learning", "Throughput", "Resilience"]


def test_the_prometheus_rule_carries_exactly_the_plain_rules() -> None:
    plain = yaml.safe_load(RULES.read_text())
    resource = yaml.safe_load((ROOT / "alerts" / "prometheusrule.yaml").read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == plain
    alerts = {r["alert"] for g in plain["groups"] for r in g["rules"] if "alert" in r}
    records = {r["record"] for g in plain["groups"] for r in g["rules"] if "record" in r}
    assert records == {"pretrainjob:step_time_ratio:rate5m"}
    assert alerts == {
        "PretrainJobFailed",
        "PretrainJobStalled",
        "PretrainJobRestartsSpiking",
        "PretrainJobSlowRestore",
        "PretrainJobCheckpointStale",
        "PretrainJobLowGoodput",
        "PretrainJobRecoveryPhaseOverBudget",
    }


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout
