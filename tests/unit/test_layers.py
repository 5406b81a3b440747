"""The layers of docs/design.md ("Layers"), declared once, in order, and checked on every
module's imports by walking its syntax tree (what an import-linter "layers" contract does).

A module may import its own layer and the layers below it. Siblings of one layer (written
``a | b``) are independent: neither imports the other. The trainer's runtime (model, data,
checkpoints, the loop) stands beside the operator's stack on the shared kernel: it never
imports the operator, and of the operator only the entry points (``cli``) import it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = {
    "pretrain_trainer": ROOT / "trainer" / "pretrain_trainer",
    "pretrain_operator": ROOT / "operator" / "pretrain_operator",
}

# Lowest first. Each layer: its independent siblings; each sibling: the module prefixes in it.
KERNEL = (
    "pretrain_trainer.agent_client",
    "pretrain_trainer.config",
    "pretrain_trainer.contract",
    "pretrain_trainer.errors",
    "pretrain_trainer.fsio",
    "pretrain_trainer.lifetime",
    "pretrain_trainer.ckpt.layout",
)
LAYERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (KERNEL,),  # what both halves share: config models, the contract, errors, atomic files
    (("pretrain_operator.api",),),
    (("pretrain_operator.plan",),),
    (("pretrain_operator.telemetry",),),
    (("pretrain_operator.kube",), ("pretrain_operator.local",)),
    (("pretrain_operator",),),  # cli, crd, manifests, summary: the entry points
)
ENTRY_POINTS = len(LAYERS) - 1

# Third-party packages a layer must never import (the pure layers load anywhere).
HEAVY = ("torch", "deepspeed", "numpy")
CLUSTER = ("kopf", "kubernetes")
FORBIDDEN = {
    "kernel": (*HEAVY, *CLUSTER, "rich"),
    "pretrain_trainer": CLUSTER,
    "pretrain_operator.api": (*HEAVY, *CLUSTER, "rich"),
    "pretrain_operator.plan": (*HEAVY, *CLUSTER, "rich"),
    "pretrain_operator.telemetry": (*HEAVY, *CLUSTER),
    "pretrain_operator.kube": HEAVY,
    "pretrain_operator.local": CLUSTER,
}


def _modules() -> list[tuple[str, Path]]:
    found = []
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found.append((".".join((package, *parts)), path))
    return found


def _imports(module: str, path: Path) -> set[str]:
    names: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = [node.module or ""]
            if node.level:
                here = module.split(".")
                base = here[: len(here) - node.level + (1 if is_package else 0)]
                base += [node.module] if node.module else []
            # `from a import b` imports a.b when b is a module, and reads a.b otherwise.
            names |= {".".join([*base, alias.name]) for alias in node.names}
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def place(module: str) -> tuple[int, int] | None:
    """(layer, sibling) of a project module by its longest declared prefix; None for the
    trainer's runtime."""
    best: tuple[int, int, int] | None = None
    for layer, siblings in enumerate(LAYERS):
        for sibling, prefixes in enumerate(siblings):
            for prefix in prefixes:
                if _within(module, prefix) and (best is None or len(prefix) > best[2]):
                    best = (layer, sibling, len(prefix))
    return None if best is None else (best[0], best[1])


def may_import(importer: str, imported: str) -> bool:
    if not _within(imported, "pretrain_trainer") and not _within(imported, "pretrain_operator"):
        return True  # third-party: see FORBIDDEN
    if imported.rsplit(".", 1)[-1].startswith("__"):
        return True  # a package's metadata (__version__), read by any layer
    source, target = place(importer), place(imported)
    if target is None:  # the trainer's runtime
        return source is None or source[0] == ENTRY_POINTS
    if source is None:  # the runtime imports the kernel only
        return target[0] == 0
    layer, sibling = source
    return target[0] < layer or target == (layer, sibling)


def _forbidden(module: str) -> tuple[str, ...]:
    if any(_within(module, k) for k in KERNEL):
        return FORBIDDEN["kernel"]
    key = max((k for k in FORBIDDEN if _within(module, k)), key=len, default=None)
    return FORBIDDEN[key] if key is not None else ()


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_module_imports_no_layer_above_it_and_no_sibling(module: str, path: Path) -> None:
    imported = _imports(module, path)
    wrong = sorted(name for name in imported if not may_import(module, name))
    heavy = sorted(n for n in imported for bad in _forbidden(module) if _within(n, bad))
    assert (wrong, heavy) == ([], [])


@pytest.mark.parametrize(
    ("importer", "imported", "allowed"),
    [
        ("pretrain_operator.plan.core", "pretrain_operator.api", True),
        ("pretrain_operator.plan.core", "pretrain_operator.kube.objects", False),
        ("pretrain_operator.api.spec", "pretrain_operator.plan", False),
        ("pretrain_operator.kube.reconcile", "pretrain_operator.local.runner", False),
        ("pretrain_operator.local.runner", "pretrain_operator.telemetry.goodput", True),
        ("pretrain_operator.telemetry.goodput", "pretrain_operator.kube", False),
        ("pretrain_operator.plan.model", "pretrain_trainer.contract", True),
        ("pretrain_operator.kube.observe", "pretrain_trainer.ckpt.manager", False),
        ("pretrain_operator.cli", "pretrain_trainer.data", True),
        ("pretrain_trainer.train", "pretrain_trainer.ckpt.manager", True),
        ("pretrain_trainer.train", "pretrain_operator.api", False),
        ("pretrain_trainer.contract", "pretrain_trainer.model", False),
        ("pretrain_trainer.config.training", "pretrain_trainer.errors", True),
    ],
)
def test_the_declaration_allows_downward_imports_only(
    importer: str, imported: str, allowed: bool
) -> None:
    assert may_import(importer, imported) is allowed


def test_pure_layers_load_without_torch_kopf_or_kubernetes() -> None:
    code = (
        "import sys, pretrain_trainer.config, pretrain_trainer.contract, pretrain_operator.api, "
        "pretrain_operator.crd, pretrain_operator.plan, pretrain_operator.telemetry.goodput\n"
        "print(sorted(m for m in ('torch', 'deepspeed', 'kopf', 'kubernetes') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_operator_folder_does_not_shadow_the_standard_library() -> None:
    import operator

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(operator.__file__ or "").resolve().parent == stdlib
    assert hasattr(operator, "itemgetter")
