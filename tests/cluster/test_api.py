"""The PretrainJob CRD in a real API server, driven with kubectl: it is accepted as structural
with its CEL rules within their cost budget, kubectl explains it, every example passes
server-side validation, and bad manifests are refused with the field path of what is wrong."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT, minimal_job
from tests.support.controlplane import ControlPlane
from tests.support.fixtures import Identity

CRD = "pretrainjobs.pretrain.dev"


@pytest.fixture
def namespace(controlplane: ControlPlane, operator_identity: Identity) -> Iterator[str]:
    """A namespace of its own (the chart, and so the CRD, is installed)."""
    name = f"api-{next(_names)}"
    controlplane.kubectl("create", "namespace", name)
    yield name
    controlplane.kubectl("delete", "namespace", name, "--wait=false")


_names = iter(range(10**6))


def kubectl_in(plane: ControlPlane, namespace: str) -> Callable[..., Any]:
    def run(*args: str, input: str | None = None, check: bool = True) -> Any:
        return plane.kubectl(*args, f"--namespace={namespace}", input=input, check=check)

    return run


def test_the_crd_is_established_structural_and_applies_server_side(
    controlplane: ControlPlane, operator_identity: Identity
) -> None:
    # The chart installed it; applying the committed file server-side is the upgrade path.
    # Helm manages the fields it created: a plain server-side apply conflicts with it.
    crd = str(ROOT / "crds" / "pretrainjob.yaml")
    refused = controlplane.kubectl("apply", "--server-side", "-f", crd, check=False)
    assert 'conflict with "helm"' in refused.stderr
    applied = controlplane.kubectl("apply", "--server-side", "--force-conflicts", "-f", crd)
    assert "serverside-applied" in applied.stdout
    again = controlplane.kubectl("apply", "--server-side", "-f", crd)  # ours now
    assert "serverside-applied" in again.stdout
    controlplane.kubectl("wait", "--for=condition=Established", f"crd/{CRD}", "--timeout=30s")
    crd = json.loads(controlplane.kubectl("get", "crd", CRD, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions == {"NamesAccepted": "True", "Established": "True"}, conditions
    assert crd["status"]["acceptedNames"]["shortNames"] == ["ptj"]


def test_kubectl_explains_the_fields_from_the_models_docstrings(
    controlplane: ControlPlane, operator_identity: Identity
) -> None:
    explained = controlplane.kubectl("explain", "pretrainjob.spec.stages.lrSchedule").stdout
    assert "Learning-rate schedule over the stage." in explained
    assert "warmupSteps" in explained
    assert "decay" in explained
    decay = controlplane.kubectl("explain", "pretrainjob.spec.stages.lrSchedule.decay").stdout
    assert "Shape of the decay after warmup." in decay
    layout = controlplane.kubectl("explain", "pretrainjob.spec.stages.parallelism").stdout
    assert "Tensor, pipeline and expert parallelism beside ZeRO data parallelism" in layout
    for field in ("tensor", "pipeline", "pipelineLayers", "expert"):
        assert field in layout


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.stem for e in EXAMPLES])
def test_every_example_passes_server_side_validation(
    controlplane: ControlPlane, namespace: str, example: Any
) -> None:
    kubectl = kubectl_in(controlplane, namespace)
    done = kubectl("apply", "--dry-run=server", "--validate=strict", "-f", str(example))
    assert "created (server dry run)" in done.stdout


def stage(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"]["stages"][0].update(fields)

    return change


def spec(**fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        doc["spec"].update(fields)

    return change


def without(field: str) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["spec"].pop(field)


# What the API server itself refuses, and the field path its message must name.
REFUSED = [
    (stage(globalBatchSize=0), "spec.stages[0].globalBatchSize", "greater than or equal to 1"),
    (
        stage(lrSchedule={"decay": "sawtooth"}),
        "spec.stages[0].lrSchedule.decay",
        'Unsupported value: "sawtooth"',
    ),
    (
        stage(budget={"steps": 10, "tokens": 100}),
        "spec.stages[0].budget",
        "set exactly one of steps or tokens",
    ),
    (stage(dataMix={"no spaces": 1}), "spec.stages[0].dataMix", "keys must match"),
    (stage(name="Foundation_1"), "spec.stages[0].name", "should match"),
    (
        spec(elastic={"minWorkers": 4, "maxWorkers": 2}),
        "spec.elastic",
        "minWorkers must not exceed maxWorkers",
    ),
    (
        spec(model={"layers": "many", "hidden": 64, "heads": 4, "vocabSize": 256, "seqLen": 32}),
        "spec.model.layers",
        "must be of type integer",
    ),
    (
        spec(data={"sources": [{"name": "prose", "path": "p"}], "seed": 2**62 + 1}),
        "spec.data.seed",
        "less than or equal to",
    ),
    (without("image"), "spec.image", "Required value"),
    (stage(globalBatchSise=8), 'unknown field "spec.stages[0].globalBatchSise"', ""),
]


@pytest.mark.parametrize(("change", "path", "message"), REFUSED, ids=[r[1] for r in REFUSED])
def test_a_bad_manifest_is_refused_by_the_api_server_naming_the_field(
    controlplane: ControlPlane,
    namespace: str,
    change: Callable[[dict[str, Any]], None],
    path: str,
    message: str,
) -> None:
    doc = copy.deepcopy(minimal_job())
    change(doc)
    kubectl = kubectl_in(controlplane, namespace)
    done = kubectl("apply", "--validate=strict", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert done.returncode != 0, done.stdout
    assert path in done.stderr, done.stderr
    assert message in done.stderr, done.stderr
    assert kubectl("get", "ptj", "-o", "name").stdout == ""  # nothing was stored
