"""The operator under test: the real kopf handlers over the test API server, plus a pretend
cluster of nodes and kubelets."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import kopf
import pytest
from kopf.testing import KopfRunner
from pretrain_operator.kube.client import KubeClient
from pretrain_operator.kube.handlers import register
from pretrain_operator.kube.settings import OperatorSettings

from tests.support.cluster import Cluster
from tests.support.kube.apiserver import ApiServer, kopf_login
from tests.support.kube.conftest import apiserver  # noqa: F401  (the fixture)

GROUP, VERSION, PLURAL = "pretrain.dev", "v1alpha1", "pretrainjobs"


@contextlib.contextmanager
def running_operator(server: ApiServer, **settings: Any) -> Iterator[KopfRunner]:
    """The operator as a user runs it (one replica), until the block ends."""
    registry = kopf.OperatorRegistry()
    kopf_login(server, registry=registry)
    defaults = {
        "standalone": True,
        "resync_seconds": 1.0,
        "standby_priority_class": "pretrain-standby",
    }
    operator = OperatorSettings(**{**defaults, **settings})
    register(registry, settings=operator, make_client=lambda: KubeClient(server.client()))
    args = ["run", "--standalone", "--namespace=default"]
    with KopfRunner(args, registry=registry, timeout=60) as runner:
        yield runner
    if runner.exception is not None:
        raise runner.exception


@pytest.fixture
def cluster(apiserver: ApiServer) -> Iterator[Cluster]:  # noqa: F811
    with Cluster(apiserver, nodes=2) as cluster:
        yield cluster


def job(name: str = "demo", *, stages: int = 2, **spec: Any) -> dict[str, Any]:
    """A small two-stage job: global batch 4 runs on 1, 2 (or 4) workers; at most 3."""
    body: dict[str, Any] = {
        "image": "trainer:test",
        "model": {"layers": 2, "hidden": 64, "heads": 4, "vocabSize": 256, "seqLen": 64},
        "data": {"sources": [{"name": "web", "path": "/data/web"}]},
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
        "metadata": {"name": name, "namespace": "default"},
        "spec": body,
    }
