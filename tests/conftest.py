"""Shared test helpers: the example manifests and a small builder for job documents."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# The real control plane, its test kubelet and the chart installed into it.
pytest_plugins = ["tests.support.fixtures"]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def minimal_job(**spec_overrides: Any) -> dict[str, Any]:
    """The smallest valid PretrainJob document; keyword arguments replace spec fields."""
    spec: dict[str, Any] = {
        "image": "trainer:test",
        "model": {"layers": 2, "hidden": 64, "heads": 4, "vocabSize": 256, "seqLen": 32},
        "data": {"sources": [{"name": "prose", "path": "p"}, {"name": "code", "path": "c"}]},
        "stages": [
            {
                "name": "foundation",
                "budget": {"steps": 10},
                "dataMix": {"prose": 3, "code": 1},
                "globalBatchSize": 8,
            }
        ],
    }
    spec.update(copy.deepcopy(spec_overrides))
    return {
        "apiVersion": "pretrain.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": {"name": "demo"},
        "spec": spec,
    }


def with_stage(doc: dict[str, Any], index: int = 0, **fields: Any) -> dict[str, Any]:
    """A copy of ``doc`` with fields of one stage replaced."""
    out = copy.deepcopy(doc)
    out["spec"]["stages"][index].update(copy.deepcopy(fields))
    return out


@pytest.fixture(params=EXAMPLES, ids=[p.name for p in EXAMPLES])
def example_doc(request: pytest.FixtureRequest) -> Any:
    return load_yaml(request.param)


@pytest.fixture
def free_port() -> int:
    """A port nothing listens on right now (each test gets its own)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
