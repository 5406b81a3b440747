"""The README's "Install on a GPU cluster", command for command as written, on a control plane
of its own: install with the monitoring objects, submit the example job (its claims bound to
volumes), watch it run, upgrade the CRD and the release, delete the jobs and the CRD, uninstall. The
operator runs in-process as the release's ServiceAccount with the settings of its Deployment;
the test kubelet plays one 8-GPU node."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.test_helm import deployed_settings
from tests.conftest import ROOT
from tests.operator.conftest import running_operator
from tests.support.controlplane import ControlPlane, unavailable
from tests.support.fixtures import HELM, release_identity
from tests.support.kubelet import Kubelet

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
RELEASE, NAMESPACE = "pretrain-operator", "pretrain-system"
# What a command cannot do here: build images, or follow output forever.
SKIP = ("docker build", "kubectl get ptj -w", "kubectl logs -f")
# prometheus-operator's CRDs, as far as the chart's objects need them (their names and kinds).
MONITORING_CRDS = [
    ("servicemonitors", "ServiceMonitor"),
    ("podmonitors", "PodMonitor"),
    ("prometheusrules", "PrometheusRule"),
]
# The two claims the example mounts, each bound to a volume (any ReadWriteMany store).
STORAGE = """
apiVersion: v1
kind: PersistentVolume
metadata: {{name: {name}}}
spec:
  capacity: {{storage: 1Ti}}
  accessModes: [ReadWriteMany]
  hostPath: {{path: /srv/{name}}}
  claimRef: {{namespace: default, name: {name}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: {name}, namespace: default}}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: {name}
  resources: {{requests: {{storage: 1Ti}}}}
"""


def section() -> str:
    text = README.read_text()
    start = text.index("## Install on a GPU cluster")
    return text[start : text.index("\n## ", start + 1)]


def blocks(text: str) -> list[list[str]]:
    """The commands of each ``console`` block: continuation lines joined, comments dropped."""
    found = []
    for body in re.findall(r"```console\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", body)
        commands = [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()]
        found.append([c for c in commands if c and not c.startswith("#")])
    return found


def inline(text: str, prefix: str) -> str:
    (command,) = re.findall(rf"`({prefix}[^`]*)`", text)
    return command


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    reason = unavailable() or (None if os.access(HELM, os.X_OK) else "helm is not installed")
    if reason:
        pytest.skip(reason)
    with ControlPlane(tmp_path_factory.mktemp("readme")) as plane:
        yield plane


def shell(plane: ControlPlane, command: str) -> str:
    """Run a README command as a user would, with kubectl, helm and pretrainctl on PATH."""
    env = {
        **os.environ,
        "KUBECONFIG": str(plane.kubeconfig),
        "PATH": os.pathsep.join(
            [
                str(ROOT / ".tools" / "bin"),
                str(Path(HELM).parent),
                str(ROOT / ".venv" / "bin"),
                os.environ["PATH"],
            ]
        ),
    }
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"
    return done.stdout


def monitoring_crds(plane: ControlPlane) -> None:
    for plural, kind in MONITORING_CRDS:
        crd = {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.monitoring.coreos.com"},
            "spec": {
                "group": "monitoring.coreos.com",
                "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            }
                        },
                    }
                ],
            },
        }
        plane.kubectl("apply", "-f", "-", input=json.dumps(crd))
    for plural, _ in MONITORING_CRDS:
        plane.kubectl("wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com")


def test_the_readmes_install_submit_upgrade_and_uninstall_work_as_written(
    plane: ControlPlane,
) -> None:
    text = section()
    install, submit, upgrade = (b for b in blocks(text) if not b[0].startswith("docker"))
    monitoring_crds(plane)
    for command in install:
        shell(plane, command)
    for kind in ("servicemonitor", "podmonitor", "prometheusrule"):
        plane.kubectl("get", kind, f"--namespace={NAMESPACE}", "-o", "name")
    for name in ("pretrain-data", "pretrain-checkpoints"):
        plane.kubectl("apply", "-f", "-", input=STORAGE.format(name=name))
    identity = release_identity(plane, RELEASE, NAMESPACE)
    settings = deployed_settings(plane, RELEASE, NAMESPACE)
    overrides = {"resync_seconds": 1.0, "metrics_port": 0, "health_port": 0}
    with (
        Kubelet(plane, "default", nodes=1) as kube,
        running_operator(
            plane,
            identity,
            None,
            args=(f"--peering={settings.peering}",),
            **{**settings.model_dump(), **overrides},
        ),
    ):
        outputs = [shell(plane, c) for c in submit if not c.startswith(SKIP)]
        assert "pretrainjob.pretrain.dev/gpu-1node created" in outputs[0]
        worker = kube.eventually(
            lambda: [
                p for p in kube.pods("worker") if (p.get("status") or {}).get("phase") == "Running"
            ],
            what="the example's worker running",
        )[0]
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in worker["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {"pretrain-data", "pretrain-checkpoints"}
        kube.eventually(lambda: "Running" in shell(plane, "kubectl get ptj"), what="PHASE Running")
        described = shell(plane, "kubectl describe ptj gpu-1node")
        assert "Created" in described  # the events explain the decisions
        for command in upgrade:
            shell(plane, command)
        # Everything goes: the jobs first, while the operator releases their finalizers, and
        # through owner references their pods; then the CRD.
        shell(plane, inline(text, "kubectl delete ptj"))
        kube.eventually(lambda: kube.pods() == [], timeout=60, what="the job's pods collected")
        shell(plane, inline(text, "kubectl delete crd"))
    shell(plane, inline(text, "helm uninstall"))
    left = plane.kubectl(
        "get", "serviceaccount", identity.service_account, f"--namespace={NAMESPACE}", check=False
    )
    assert "NotFound" in left.stderr
