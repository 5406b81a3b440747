"""Fixtures for tests against the real control plane (a pytest plugin, see ``tests/conftest.py``).

One control plane serves the whole session. The chart is installed into it once, for real, by
Helm (its CRD, RBAC, ServiceAccount and PriorityClass; no operator replicas, since no kubelet
runs containers): the operator under test then runs in-process as the chart's ServiceAccount,
so the API server enforces the chart's RBAC on every request it makes. Each test gets its own
namespace, labelled to enforce the ``restricted`` Pod Security Standard, with its own test
kubelet and nodes; at its end, any request the operator made that the API server refused as
forbidden fails the test.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import ROOT
from tests.support.controlplane import ControlPlane, unavailable
from tests.support.kubelet import Kubelet, eventually
from tests.support.running import RunningKubelet

K = TypeVar("K", bound=Kubelet)

CHART = ROOT / "charts" / "pretrain-operator"
HELM = shutil.which("helm") or str(ROOT / ".tools" / "bin" / "helm")
RELEASE, OPERATOR_NAMESPACE = "pretrain", "pretrain-system"
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
_NAMESPACES = itertools.count()


def helm(plane: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return plane.run(HELM, *args, check=check, timeout=180)


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with ControlPlane(tmp_path_factory.mktemp("controlplane")) as plane:
        yield plane


@dataclass(frozen=True)
class Identity:
    """Who the operator is: the chart's ServiceAccount, and a token for it."""

    namespace: str
    service_account: str
    token: str

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def install_chart(plane: ControlPlane) -> Identity:
    """The chart installed by Helm (cluster-wide, no replicas), and its ServiceAccount."""
    helm(
        plane,
        "install",
        RELEASE,
        str(CHART),
        f"--namespace={OPERATOR_NAMESPACE}",
        "--create-namespace",
        "--set=replicas=0",
        "--wait",
    )
    return release_identity(plane, RELEASE, OPERATOR_NAMESPACE)


def fullname(release: str) -> str:
    """What the chart names its objects (and its ServiceAccount) after: ``_helpers.tpl``."""
    return release if CHART.name in release else f"{release}-{CHART.name}"


def release_identity(plane: ControlPlane, release: str, namespace: str) -> Identity:
    """The ServiceAccount a release installed, and a token for it."""
    account = fullname(release)
    return Identity(namespace, account, plane.token(namespace, account))


@pytest.fixture(scope="session")
def operator_identity(controlplane: ControlPlane) -> Identity:
    if not os.access(HELM, os.X_OK):
        pytest.skip("helm is not installed")
    return install_chart(controlplane)


def restricted_namespace(plane: ControlPlane, name: str) -> None:
    """A namespace that enforces the ``restricted`` Pod Security Standard."""
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": RESTRICTED},
    }
    plane.kubectl("create", "-f", "-", input=json.dumps(namespace))


def namespace_for(request: pytest.FixtureRequest) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    return f"t{next(_NAMESPACES)}-{name}"


@pytest.fixture
def kube(
    controlplane: ControlPlane, operator_identity: Identity, request: pytest.FixtureRequest
) -> Iterator[Kubelet]:
    """A restricted namespace of its own and a test kubelet with two nodes of 8 GPUs."""
    with kubelet_in_namespace(controlplane, operator_identity, request, Kubelet) as kubelet:
        yield kubelet


@pytest.fixture
def running_kube(
    controlplane: ControlPlane,
    operator_identity: Identity,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> Iterator[RunningKubelet]:
    """The same, with a kubelet that runs its pods' processes (``tests/support/running.py``)."""
    make = functools.partial(RunningKubelet, workdir=tmp_path)
    with kubelet_in_namespace(controlplane, operator_identity, request, make) as kubelet:
        yield kubelet


@contextlib.contextmanager
def kubelet_in_namespace(
    controlplane: ControlPlane,
    operator_identity: Identity,
    request: pytest.FixtureRequest,
    make: Callable[..., K],
) -> Iterator[K]:
    """A test's kubelet (``make(plane, namespace, nodes=0)``) with two nodes in a restricted
    namespace of its own; afterwards, no request of the operator was refused by RBAC."""
    namespace = namespace_for(request)
    with controlplane.recording() as requests:
        restricted_namespace(controlplane, namespace)
        kubelet = make(controlplane, namespace, nodes=0)
        for _ in range(2):
            kubelet.add_node()
        with kubelet:
            yield kubelet
        end(kubelet)
    refused = [
        f"{e['verb']} {e['objectRef'].get('resource')}/{e['objectRef'].get('subresource', '')}"
        for e in requests
        if e["user"]["username"] == operator_identity.user
        and e.get("responseStatus", {}).get("code") == 403
        and not controlplane.restarting(e)
    ]
    assert not refused, f"the chart's RBAC refused the operator: {sorted(set(refused))}"


def end(kubelet: Kubelet) -> None:
    """Remove a test's namespace and nodes without waiting for the namespace to go."""
    namespace = kubelet.namespace
    # No operator serves the namespace any more: its jobs' finalizers would keep it (and them,
    # for an operator serving every namespace in a later test) for good.
    jobs = f"/apis/pretrain.dev/v1alpha1/namespaces/{namespace}/pretrainjobs"
    for job in kubelet.objects("pretrainjobs"):
        path = f"{jobs}/{job['metadata']['name']}"
        kubelet.client.request(
            "PATCH",
            path,
            body={"metadata": {"finalizers": None}},
            content_type="application/merge-patch+json",
        )
        kubelet.client.request("DELETE", path)
    eventually(lambda: kubelet.objects("pretrainjobs") == [], what="the test's jobs deleted")
    kubelet.client.request(
        "DELETE",
        f"/api/v1/namespaces/{namespace}/pods",
        body={"gracePeriodSeconds": 0},
    )
    kubelet.client.request("DELETE", f"/api/v1/namespaces/{namespace}")
    kubelet.remove_nodes()
