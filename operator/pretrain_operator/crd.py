"""Generate the PretrainJob CustomResourceDefinition from the API models.

The CRD in ``crds/`` is this module's output, committed; a test keeps the two identical, so
the schema the API server enforces can never drift from what the operator parses.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema:
no ``$ref``, a ``type`` on every node, ``nullable`` instead of ``anyOf [.., null]``,
boolean ``exclusiveMinimum``, no ``prefixItems``. :func:`structural` does that translation.
"""

from __future__ import annotations

from typing import Any

import yaml

from .api import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    JobStatus,
    PretrainJobSpec,
)

Schema = dict[str, Any]

# Keys of JSON Schema that carry no meaning for the API server (or that it rejects).
_DROPPED = {"title", "$defs", "propertyNames", "examples"}
_SCALAR_DEFAULT = (str, int, float, bool)


def structural(schema: Schema, *, defs: Schema | None = None, defaults: bool = True) -> Schema:
    """Translate one pydantic JSON Schema node (and its children) into structural OpenAPI."""
    defs = schema.get("$defs", {}) if defs is None else defs
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, defs=defs, defaults=defaults)
    options = schema.get("anyOf")
    if options is not None:
        rest = [o for o in options if o.get("type") != "null"]
        if len(rest) != 1:
            raise ValueError(f"cannot express anyOf {options} in a structural schema")
        outer = {k: v for k, v in schema.items() if k != "anyOf"}
        node = structural({**rest[0], **outer}, defs=defs, defaults=defaults)
        if len(rest) < len(options):
            node["nullable"] = True
        return node

    out: Schema = {}
    for key, value in schema.items():
        if key in _DROPPED:
            continue
        if key == "properties":
            out[key] = {
                name: structural(child, defs=defs, defaults=defaults)
                for name, child in value.items()
            }
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = structural(value, defs=defs, defaults=defaults)
        elif key == "patternProperties":
            # Structural schemas have no patternProperties: the values get their schema through
            # additionalProperties, the keys a CEL rule.
            ((pattern, child),) = value.items()
            out["additionalProperties"] = structural(child, defs=defs, defaults=defaults)
            out.setdefault("x-kubernetes-validations", []).append(_keys_rule(schema, pattern))
        elif key == "prefixItems":
            kinds = [structural(v, defs=defs, defaults=defaults) for v in value]
            if any(k != kinds[0] for k in kinds):
                raise ValueError("a tuple of mixed types has no structural schema")
            out.update(items=kinds[0], minItems=len(kinds), maxItems=len(kinds))
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = key.removeprefix("exclusive").lower()
            if schema.get("type") == "integer":  # `> 0` reads better as `minimum: 1`
                out[bound] = value + 1 if bound == "minimum" else value - 1
            else:
                out[bound] = value
                out[key] = True
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; kubectl explain re-wraps
        elif key == "const":
            out["enum"] = [value]
        elif key == "default":
            if defaults and isinstance(value, _SCALAR_DEFAULT):
                out[key] = value
        else:
            out[key] = value
    if "properties" in out or out.get("additionalProperties") is False:
        # Structural schemas forbid `additionalProperties` beside `properties`: the API server
        # prunes unknown fields instead (and rejects them under strict field validation).
        out.pop("additionalProperties", None)
    if "x-kubernetes-int-or-string" in out:
        out.pop("type", None)
    elif "type" not in out:
        raise ValueError(f"schema node without a type: {schema}")
    first = [k for k in ("type", "description") if k in out]
    return {k: out[k] for k in (*first, *(k for k in out if k not in first))}


def _keys_rule(schema: Schema, pattern: str) -> Schema:
    longest = schema.get("propertyNames", {}).get("maxLength")
    size = f"size(k) <= {longest} && " if longest else ""
    return {
        "rule": f"self.all(k, {size}k.matches('{pattern}'))",
        "message": f"keys must match {pattern}"
        + (f" and be at most {longest} long" if longest else ""),
    }


def spec_schema() -> Schema:
    return structural(PretrainJobSpec.model_json_schema(by_alias=True, mode="validation"))


def status_schema() -> Schema:
    # Status is written by the operator; defaults there would be invented by the API server.
    raw = JobStatus.model_json_schema(by_alias=True, mode="serialization")
    return structural(raw, defaults=False)


def open_api_schema() -> Schema:
    return {
        "type": "object",
        "description": "A multi-stage, elastic pretraining job.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage.name"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
    {"name": "Workers", "type": "integer", "jsonPath": ".status.workers.ready"},
    {"name": "Desired", "type": "integer", "jsonPath": ".status.workers.desired", "priority": 1},
    {"name": "Loss", "type": "number", "jsonPath": ".status.loss", "priority": 1},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts.total", "priority": 1},
    {"name": "Goodput", "type": "number", "jsonPath": ".status.goodput.ratio", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> Schema:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = (
        f"# Generated from the {API_VERSION} {KIND} models by `pretrainctl crd`. Do not edit.\n"
    )
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)
