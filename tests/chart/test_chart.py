"""The Helm chart, with the real helm binary and no cluster: lint, render, schema, Kubernetes
validation, least privilege and pod security as rendered. Plus the container images'
Dockerfiles against the code they package. (``tests/cluster`` installs it into a real control
plane, whose API server enforces its RBAC on the operator.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

CHART = ROOT / "charts" / "pretrain-operator"
HELM = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
needs_helm = pytest.mark.skipif(not os.access(HELM, os.X_OK), reason="helm is not installed")

EVERYTHING = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "gangScheduler=volcano",
]
NAMESPACED = ["--set", "namespaces={ml,research}"]
CONFIGS = {"default": [], "namespaced": NAMESPACED, "everything": EVERYTHING}
# Kinds Kubernetes' own schemas do not know (CRD instances).
FOREIGN = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ClusterKopfPeering", "KopfPeering"}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([HELM, *args], capture_output=True, text=True, check=False, timeout=120)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def rendered(*values: str, crds: bool = False) -> list[dict[str, Any]]:
    args = ["template", "pretrain", str(CHART), "--namespace", "ops", *values]
    out = helm(*args, *(["--include-crds"] if crds else [])).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_chart_carries_the_crd_dashboards_and_rules_unchanged() -> None:
    assert (CHART / "crds" / "pretrainjob.yaml").read_text() == (
        ROOT / "crds" / "pretrainjob.yaml"
    ).read_text()
    for dashboard in (ROOT / "dashboards").glob("*.json"):
        assert (CHART / "files" / dashboard.name).read_text() == dashboard.read_text()
    rules = ROOT / "alerts" / "pretrainjob-rules.yaml"
    assert (CHART / "files" / rules.name).read_text() == rules.read_text()


@needs_helm
@pytest.mark.parametrize("config", CONFIGS)
def test_helm_lint_passes(config: str) -> None:
    done = helm("lint", str(CHART), "--strict", *CONFIGS[config])
    assert "0 chart(s) failed" in done.stdout


@needs_helm
@pytest.mark.parametrize("config", CONFIGS)
def test_rendered_objects_validate_against_kubernetes_1_29_to_1_33(config: str) -> None:
    for document in rendered(*CONFIGS[config], crds=True):
        if document["kind"] in FOREIGN:
            continue
        for version in ("1.29", "1.31", "1.33"):
            kubernetes_validate.validate(document, version, strict=True)


@needs_helm
@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "replicas=two"], "replicas: Invalid type. Expected: integer"),
        (["--set", "replica=2"], "Additional property replica is not allowed"),
        (["--set", "gangScheduler=slurm"], "gangScheduler: gangScheduler must be one of"),
        (["--set", "metrics.port=0"], "metrics.port: Must be greater than or equal to 1"),
        (["--set", "namespaces={ML}"], "namespaces.0: Does not match pattern"),
    ],
)
def test_a_values_typo_fails_at_install_against_the_schema(values: list[str], message: str) -> None:
    done = helm("template", "pretrain", str(CHART), *values, check=False)
    assert done.returncode != 0
    assert message in done.stderr


def _rules(documents: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for document in documents:
        if document["kind"] in ("ClusterRole", "Role"):
            for rule in document["rules"]:
                yield document["kind"], rule


@needs_helm
@pytest.mark.parametrize("config", CONFIGS)
def test_rbac_grants_nothing_broad_no_secrets_and_no_exec(config: str) -> None:
    documents = rendered(*CONFIGS[config])
    rules = list(_rules(documents))
    assert rules
    for _, rule in rules:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert "*" not in rule.get("apiGroups", [])
        assert "secrets" not in rule["resources"]
        assert not [r for r in rule["resources"] if r.startswith("pods/")]  # exec, log, attach
    if config == "namespaced":
        roles = [d for d in documents if d["kind"] == "Role"]
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
        cluster = [rule for kind, rule in rules if kind == "ClusterRole"]
        assert {v for rule in cluster for v in rule["verbs"]} == {"list", "watch"}  # reads only
        assert {r for rule in cluster for r in rule["resources"]} == {
            "namespaces",
            "customresourcedefinitions",
            "nodes",
        }


@needs_helm
@pytest.mark.parametrize("config", CONFIGS)
def test_the_operator_pod_is_locked_down(config: str) -> None:
    (deployment,) = [d for d in rendered(*CONFIGS[config]) if d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any("hostPath" in v for v in spec.get("volumes", []))
    assert not spec.get("hostNetwork")
    (container,) = spec["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["command"] == ["pretrainctl", "operator"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PRETRAIN_OPERATOR_NAMESPACES"] == ("ml,research" if config == "namespaced" else "")
    from pretrain_operator.kube.settings import OperatorSettings

    OperatorSettings.from_environ(env)  # every variable the chart sets is a valid setting


@needs_helm
def test_dashboards_ship_as_configmaps_for_the_grafana_sidecar() -> None:
    maps = [d for d in rendered() if d["kind"] == "ConfigMap"]
    assert {m["metadata"]["labels"]["grafana_dashboard"] for m in maps} == {"1"}
    shipped = {name: json.loads(text) for m in maps for name, text in m["data"].items()}
    assert set(shipped) == {"pretrainjob-overview.json", "operator-health.json"}
    assert shipped["pretrainjob-overview.json"]["uid"] == "pretrainjob-overview"
    (rule,) = [d for d in rendered(*EVERYTHING) if d["kind"] == "PrometheusRule"]
    plain = yaml.safe_load((ROOT / "alerts" / "pretrainjob-rules.yaml").read_text())
    assert rule["spec"] == plain


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


@pytest.mark.parametrize("image", ["operator", "trainer"])
def test_dockerfiles_copy_what_exists_and_run_as_a_non_root_user(image: str) -> None:
    steps = _instructions(ROOT / image / "Dockerfile")
    for command, argument in steps:
        if command == "COPY":
            for source in argument.split()[:-1]:
                assert (ROOT / source).exists(), f"{image}/Dockerfile copies missing {source}"
    users = [argument for command, argument in steps if command == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("0", "root")


def test_the_images_provide_the_entry_points_the_code_runs() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    operator = dict(_instructions(ROOT / "operator" / "Dockerfile"))
    assert json.loads(operator["ENTRYPOINT"])[0] in scripts  # pretrainctl
    assert json.loads(operator["CMD"]) == ["operator"]
    installs = [
        arg for command, arg in _instructions(ROOT / "operator" / "Dockerfile") if command == "RUN"
    ]
    assert not [i for i in installs if "torch" in i or "deepspeed" in i]  # a slim image
    trainer = (ROOT / "trainer" / "Dockerfile").read_text()
    assert "pytorch/pytorch:" in trainer  # an official PyTorch CUDA image: torchrun included
    assert "deepspeed==0.19.8" in trainer
    from pretrain_operator.kube.objects import rendezvous_pod, standby_pod, worker_pod
    from pretrain_operator.manifests import load_job
    from pretrain_operator.plan import Group

    tiny = load_job(ROOT / "examples" / "tiny-cpu.yaml")
    commands = [worker_pod(tiny, Group(0, 1, (0,)), 0), rendezvous_pod(tiny), standby_pod(tiny, 0)]
    for pod in commands:
        command = pod["spec"]["containers"][0]["command"]
        if command[:2] == ["python", "-m"]:
            module = command[2].replace(".", "/")
            assert (ROOT / "trainer" / f"{module}.py").exists(), command
        elif command[0] == "torchrun":
            assert command[-2:] == ["-m", "pretrain_trainer"]
            assert (ROOT / "trainer" / "pretrain_trainer" / "__main__.py").exists()
        else:
            assert command == ["sleep", "infinity"]
