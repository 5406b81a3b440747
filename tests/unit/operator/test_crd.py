"""The CRD is generated from the models, structural, valid, and agrees with the examples."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pretrain_operator.crd import crd, crd_yaml, open_api_schema

from tests.conftest import ROOT, minimal_job, with_stage

COMMITTED = ROOT / "crds" / "pretrainjob.yaml"


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text() == crd_yaml(), "run `make crd` and commit crds/pretrainjob.yaml"


@pytest.mark.parametrize("version", ["1.29", "1.30", "1.31", "1.32", "1.33"])
def test_crd_is_a_valid_kubernetes_object(version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load(COMMITTED.read_text()), version, strict=True)


def _nodes(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _nodes(schema[key], f"{path}[]")


def test_schema_is_structural() -> None:
    # The API server rejects non-structural schemas; these are the rules that bite.
    for path, node in _nodes(open_api_schema()):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), path
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "prefixItems", "$defs", "const"):
            assert forbidden not in node, f"{path} has {forbidden}"
        assert not ("properties" in node and "additionalProperties" in node), path
        for flag in ("exclusiveMinimum", "exclusiveMaximum", "nullable"):
            assert isinstance(node.get(flag, False), bool), f"{path}.{flag}"
        if "default" in node:
            assert not isinstance(node["default"], dict | list), path


def test_every_spec_field_is_described_for_kubectl_explain() -> None:
    spec = open_api_schema()["properties"]["spec"]
    undocumented = [path for path, node in _nodes(spec, ".spec") if not node.get("description")]
    # List items and map values are described by their parent field.
    undocumented = [p for p in undocumented if not p.endswith("[]")]
    assert undocumented == []


def test_crd_names_status_subresource_and_printer_columns() -> None:
    spec = crd()["spec"]
    assert (spec["group"], spec["names"]["kind"], spec["names"]["shortNames"]) == (
        "pretrain.dev",
        "PretrainJob",
        ["ptj"],
    )
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Phase", "Stage", "Step", "Workers", "Age"]


def test_cross_field_rules_are_also_cel_rules_in_the_schema() -> None:
    stage = open_api_schema()["properties"]["spec"]["properties"]["stages"]["items"]
    rules = stage["properties"]["budget"]["x-kubernetes-validations"]
    assert rules[0]["rule"] == "has(self.steps) != has(self.tokens)"


def _as_json_schema(node: Any) -> Any:
    """OpenAPI v3.0 (Kubernetes flavour) -> JSON Schema draft 4, for jsonschema."""
    if isinstance(node, list):
        return [_as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        out["additionalProperties"] = False  # what strict field validation enforces
    return out


VALIDATOR = jsonschema.Draft4Validator(_as_json_schema(open_api_schema()))


def test_examples_validate_against_the_crd_schema(example_doc: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(example_doc)]
    assert errors == []


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        (with_stage(minimal_job(), globalBatchSize=-1), ["spec", "stages", 0, "globalBatchSize"]),
        (with_stage(minimal_job(), precision="fp16"), ["spec", "stages", 0, "precision"]),
        (with_stage(minimal_job(), zeroStage=4), ["spec", "stages", 0, "zeroStage"]),
        (minimal_job(stages=[]), ["spec", "stages"]),
        (minimal_job(nprocPerWorker="8"), ["spec", "nprocPerWorker"]),
    ],
)
def test_crd_schema_rejects_what_the_models_reject(doc: dict[str, Any], where: list[Any]) -> None:
    assert [list(e.absolute_path) for e in VALIDATOR.iter_errors(doc)] == [where]
