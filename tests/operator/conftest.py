"""The operator under test: the real kopf handlers, as the chart's ServiceAccount, against the
real control plane, with the test kubelet playing the nodes (``tests/support/kubelet.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from pretrain_operator.kube.client import KubeClient
from pretrain_operator.kube.handlers import register
from pretrain_operator.kube.settings import OperatorSettings

from tests.support.controlplane import ControlPlane
from tests.support.fixtures import Identity
from tests.support.kubelet import Kubelet

GROUP, VERSION, PLURAL = "pretrain.dev", "v1alpha1", "pretrainjobs"
Operator = Callable[..., contextlib.AbstractContextManager[KopfRunner]]


def login(plane: ControlPlane, identity: Identity, namespace: str, registry: Any) -> None:
    """Register a kopf login handler for ``identity`` (kopf ignores a KUBECONFIG set after
    import)."""

    def handler(**_: Any) -> Any:
        return plane.connection_info(identity.token, namespace=namespace)

    kopf.on.login(registry=registry)(handler)


@contextlib.contextmanager
def running_operator(
    plane: ControlPlane,
    identity: Identity,
    namespace: str | None,
    *,
    client: Callable[[Any], KubeClient] = KubeClient,
    args: tuple[str, ...] = ("--standalone",),
    **settings: Any,
) -> Iterator[KopfRunner]:
    """The operator as a user runs it (one replica, serving ``namespace``, or every namespace
    when it is None), until the block ends."""
    registry = kopf.OperatorRegistry()
    login(plane, identity, namespace or "default", registry)
    defaults = {
        "standalone": True,
        "resync_seconds": 1.0,
        "standby_priority_class": "pretrain-standby",
    }
    operator = OperatorSettings(**{**defaults, **settings})
    register(registry, settings=operator, make_client=lambda: client(plane.client(identity.token)))
    scope = f"--namespace={namespace}" if namespace else "--all-namespaces"
    with KopfRunner(["run", *args, scope], registry=registry, timeout=60) as runner:
        yield runner
    if runner.exception is not None:
        raise runner.exception


@pytest.fixture(params=[True, False], ids=["agent-pods", "torchrun-pods"])
def agents(request: pytest.FixtureRequest) -> bool:
    """Whether worker pods run the worker agent (and outlive attempts) or torchrun."""
    return bool(request.param)


@pytest.fixture
def operator(
    controlplane: ControlPlane, operator_identity: Identity, kube: Kubelet, agents: bool
) -> Operator:
    """``with operator(**settings):`` runs the operator on the test's namespace, its worker
    pods both ways."""

    def start(**settings: Any) -> contextlib.AbstractContextManager[KopfRunner]:
        settings = {"worker_agents": agents, **settings}
        return running_operator(controlplane, operator_identity, kube.namespace, **settings)

    return start


def job(
    name: str = "demo", *, stages: int = 2, namespace: str = "default", **spec: Any
) -> dict[str, Any]:
    """A small two-stage job: global batch 4 runs on 1, 2 (or 4) workers; at most 3. Each
    worker asks for a whole node of 8 GPUs."""
    body: dict[str, Any] = {
        "image": "trainer:test",
        "model": {"layers": 2, "hidden": 64, "heads": 4, "vocabSize": 256, "seqLen": 64},
        "data": {"sources": [{"name": "web", "path": "/data/web"}]},
        "resources": {"limits": {"nvidia.com/gpu": 8}},
        "elastic": {
            "minWorkers": 1,
            "maxWorkers": 3,
            "maxRestarts": 3,
            "restartBackoffSeconds": 0,
            "scaleUpCooldownSeconds": 2,
        },
        "checkpoint": {"path": "/ckpt", "intervalSteps": 10},
        "stages": [
            {
                "name": f"s{i}",
                "budget": {"steps": 10},
                "dataMix": {"web": 1},
                "globalBatchSize": 4,
                "microBatchSize": 1,
            }
            for i in range(stages)
        ],
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PretrainJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }
