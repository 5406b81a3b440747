"""The chart installed, upgraded and uninstalled by Helm into a real control plane, in both
modes; its RBAC enforced by the API server on the operator as the chart deploys it; its pod
admitted under the ``restricted`` Pod Security Standard."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pretrain_operator.kube.actions import CHECKPOINT_STEP
from pretrain_operator.kube.settings import OperatorSettings

from tests.operator.conftest import GROUP, PLURAL, VERSION, job, running_operator
from tests.support.controlplane import ControlPlane
from tests.support.fixtures import (
    CHART,
    Identity,
    fullname,
    helm,
    release_identity,
    restricted_namespace,
)
from tests.support.kubelet import Kubelet, eventually

pytestmark = pytest.mark.slow


def install(plane: ControlPlane, release: str, namespace: str, *values: str) -> None:
    """A release of its own beside the session's (which owns the PriorityClass)."""
    helm(
        plane,
        "install",
        release,
        str(CHART),
        f"--namespace={namespace}",
        "--set=standby.priorityClass.create=false",
        *values,
        "--wait",
    )


def can(plane: ControlPlane, user: str, verb: str, resource: str, *where: str) -> bool:
    done = plane.kubectl("auth", "can-i", verb, resource, f"--as={user}", *where, check=False)
    return done.stdout.strip() == "yes"


def deployed_settings(plane: ControlPlane, release: str, namespace: str) -> OperatorSettings:
    """The operator's settings as the release's Deployment passes them: its environment."""
    name = fullname(release)
    deployment = json.loads(
        plane.kubectl("get", "deployment", name, f"--namespace={namespace}", "-o", "json").stdout
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return OperatorSettings.from_environ({e["name"]: e.get("value", "") for e in container["env"]})


@dataclass(frozen=True)
class Release:
    """A namespaced release: its name, its own namespace, the two it serves, one it does not,
    and the operator's identity."""

    name: str
    home: str
    served: tuple[str, str]
    other: str
    identity: Identity

    @property
    def account(self) -> str:
        return self.identity.service_account


_releases = itertools.count()


@pytest.fixture
def team(controlplane: ControlPlane, operator_identity: Identity) -> Iterator[Release]:
    """A namespaced release serving two namespaces, with no operator replicas."""
    name = f"team{next(_releases)}"
    home, served, other = f"{name}-system", (f"{name}-a", f"{name}-b"), f"{name}-c"
    for namespace in (home, *served, other):
        restricted_namespace(controlplane, namespace)
    install(
        controlplane, name, home, f"--set=namespaces={{{','.join(served)}}}", "--set=replicas=0"
    )
    yield Release(name, home, served, other, release_identity(controlplane, name, home))
    helm(controlplane, "uninstall", name, f"--namespace={home}", check=False)
    for namespace in (home, *served, other):
        controlplane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_a_namespaced_release_grants_its_namespaces_and_nothing_elsewhere(
    controlplane: ControlPlane, team: Release
) -> None:
    user = team.identity.user
    for namespace in team.served:
        assert can(controlplane, user, "create", "pods", f"--namespace={namespace}")
        assert can(
            controlplane,
            user,
            "patch",
            "pretrainjobs.pretrain.dev/status",
            f"--namespace={namespace}",
        )
        assert can(controlplane, user, "get", "kopfpeerings.kopf.dev", f"--namespace={namespace}")
    assert not can(controlplane, user, "create", "pods", f"--namespace={team.other}")
    assert not can(controlplane, user, "list", "pretrainjobs.pretrain.dev", "--all-namespaces")
    assert not can(controlplane, user, "get", "secrets", f"--namespace={team.served[0]}")
    exec_ = ("--subresource=exec", f"--namespace={team.served[0]}")
    assert not can(controlplane, user, "create", "pods", *exec_)
    assert can(controlplane, user, "watch", "nodes")  # watchNodes: a read-only ClusterRole
    assert not can(controlplane, user, "patch", "nodes")


def test_the_operator_as_a_namespaced_release_deploys_it_runs_a_job_through_its_life(
    controlplane: ControlPlane, team: Release
) -> None:
    """Every request of a job's whole life (start, a failed worker, a stage's end and its
    checkpoint on the next stage's workers, suspend, delete) is granted by the namespaced
    Role, enforced by the API server."""
    settings = deployed_settings(controlplane, team.name, team.home)
    assert settings.namespaces == team.served
    served = team.served[0]
    jobs = f"/apis/{GROUP}/{VERSION}/namespaces/{served}/{PLURAL}"
    with controlplane.recording() as requests, Kubelet(controlplane, served, nodes=2) as kube:
        operator = running_operator(
            controlplane,
            team.identity,
            served,
            args=(f"--peering={settings.peering}",),
            **{**settings.model_dump(), "resync_seconds": 1.0, "metrics_port": 0, "health_port": 0},
        )
        try:
            with operator:
                kube.client.request("POST", jobs, body=job(namespace=served))

                first = kube.eventually(lambda: kube.attempt(1), what="2 workers")
                kube.finish(first[0], exit_code=1)
                second = kube.eventually(lambda: kube.attempt(2), what="attempt 2")
                done = {"finished": True, "stage": 0, "step": 10, "tokens": 640, "checkpoint": "/c"}
                for name in second:  # stage 0 ends; stage 1's workers carry its checkpoint
                    kube.finish(name, exit_code=0, report=done)

                def annotated() -> bool:
                    pods = [kube.pod(n) for n in kube.attempt(3)]
                    notes = [(p["metadata"].get("annotations") or {}) for p in pods]
                    return bool(pods) and all(CHECKPOINT_STEP in n for n in notes)

                kube.eventually(annotated, what="stage 1's workers annotated")
                kube.client.request(
                    "PATCH",
                    f"{jobs}/demo",
                    body={"spec": {"suspend": True}},
                    content_type="application/merge-patch+json",
                )
                kube.eventually(lambda: kube.pods() == [], what="suspended")
                kube.client.request("DELETE", f"{jobs}/demo")
                kube.eventually(lambda: kube.objects(PLURAL) == [], what="deleted")
        finally:
            kube.remove_nodes()
    ours = [e for e in requests if e["user"]["username"] == team.identity.user]
    refused = sorted({_what(e) for e in ours if e.get("responseStatus", {}).get("code") == 403})
    assert refused == [], refused
    used = {_what(e) for e in ours}
    # The recording is of the operator at work.
    assert {"create pods", "patch pretrainjobs/status", "create events"} <= used, sorted(used)
    role = json.loads(
        controlplane.kubectl(
            "get", "role", team.account, f"--namespace={served}", "-o", "json"
        ).stdout
    )
    granted = {
        f"{v} {r}" for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]
    }
    # Nothing granted that was not asked for, but the owner's finalizers (which the
    # OwnerReferencesPermissionEnforcement admission checks on every create of an owned
    # object) and kopf's read of its peering object.
    assert granted - used == {"update pretrainjobs/finalizers", "get kopfpeerings"}


def _what(event: dict[str, Any]) -> str:
    ref = event.get("objectRef") or {}
    resource = ref.get("resource", "")
    if ref.get("subresource"):
        resource += f"/{ref['subresource']}"
    return f"{event['verb']} {resource}"


def test_upgrade_changes_the_deployment_and_uninstall_keeps_the_crd_and_the_jobs(
    controlplane: ControlPlane, team: Release
) -> None:
    kept = team.served[1]
    controlplane.kubectl("apply", "-f", "-", input=json.dumps(job("kept", namespace=kept)))
    home = f"--namespace={team.home}"
    helm(
        controlplane,
        "upgrade",
        team.name,
        str(CHART),
        home,
        "--reuse-values",
        "--set=resyncSeconds=7",
        "--wait",
    )
    assert deployed_settings(controlplane, team.name, team.home).resync_seconds == 7
    history = json.loads(helm(controlplane, "history", team.name, home, "-o", "json").stdout)
    assert [r["revision"] for r in history] == [1, 2]
    assert history[-1]["status"] == "deployed"
    helm(controlplane, "uninstall", team.name, home, "--wait")
    role = controlplane.kubectl("get", "role", team.account, f"--namespace={kept}", check=False)
    assert "NotFound" in role.stderr
    assert not can(controlplane, team.identity.user, "create", "pods", f"--namespace={kept}")
    controlplane.kubectl("get", "crd", "pretrainjobs.pretrain.dev")
    left = controlplane.kubectl("get", "ptj", "kept", f"--namespace={kept}", "-o", "name")
    assert left.stdout.strip() == "pretrainjob.pretrain.dev/kept"


def test_the_operators_own_pod_is_admitted_under_the_restricted_pod_security_standard(
    controlplane: ControlPlane, operator_identity: Identity
) -> None:
    namespace = "psa-system"
    restricted_namespace(controlplane, namespace)
    try:
        helm(
            controlplane,
            "install",
            "psa",
            str(CHART),
            f"--namespace={namespace}",
            "--set=standby.priorityClass.create=false",
            "--set=namespaces={psa-system}",
            "--set=replicas=1",
        )
        selector = "app.kubernetes.io/instance=psa"

        def pods() -> list[str]:
            listed = controlplane.kubectl(
                "get", "pods", f"--namespace={namespace}", "-l", selector, "-o", "name"
            )
            return listed.stdout.split()

        def refusals() -> str:
            events = controlplane.kubectl("get", "events", f"--namespace={namespace}", "-o", "json")
            return " ".join(
                e["message"]
                for e in json.loads(events.stdout)["items"]
                if e["reason"] == "FailedCreate"
            )

        eventually(
            lambda: pods() or refusals(), timeout=60, what="the ReplicaSet's pod or its refusal"
        )
        assert refusals() == ""
        assert len(pods()) == 1
    finally:
        helm(controlplane, "uninstall", "psa", f"--namespace={namespace}", check=False)
        controlplane.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
