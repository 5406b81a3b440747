"""The layering of DESIGN 2: a module imports only layers below it."""

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

# module prefix -> imports it must never make (third-party or higher project layers)
FORBIDDEN = {
    "pretrain_trainer.config": ("torch", "deepspeed", "kopf", "kubernetes", "pretrain_operator"),
    "pretrain_trainer.contract": ("torch", "deepspeed", "kopf", "kubernetes", "pretrain_operator"),
    "pretrain_trainer": ("kopf", "kubernetes", "pretrain_operator"),
    "pretrain_operator.api": (
        "torch",
        "deepspeed",
        "kopf",
        "kubernetes",
        "pretrain_operator.crd",
        "pretrain_operator.cli",
        "rich",
    ),
    "pretrain_operator.plan": (
        "torch",
        "deepspeed",
        "kopf",
        "kubernetes",
        "pretrain_operator.cli",
        "pretrain_operator.crd",
        "rich",
    ),
    "pretrain_operator.crd": ("torch", "deepspeed", "kopf", "kubernetes", "pretrain_operator.cli"),
    # The two backends know nothing of each other; telemetry serves both and neither's API.
    "pretrain_operator.telemetry": (
        "torch",
        "deepspeed",
        "kopf",
        "kubernetes",
        "pretrain_operator.kube",
        "pretrain_operator.local",
        "pretrain_operator.cli",
    ),
    "pretrain_operator.kube": (
        "torch",
        "deepspeed",
        "pretrain_operator.local",
        "pretrain_operator.cli",
    ),
    "pretrain_operator.local": (
        "kopf",
        "kubernetes",
        "pretrain_operator.kube",
        "pretrain_operator.cli",
    ),
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
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module or "")
    return names


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_module_imports_no_layer_above_it(module: str, path: Path) -> None:
    rules = [
        bad
        for prefix, bad in FORBIDDEN.items()
        if module == prefix or module.startswith(prefix + ".")
    ]
    imported = _imports(module, path)
    violations = sorted(
        name
        for name in imported
        for bad in (b for r in rules for b in r)
        if name == bad or name.startswith(bad + ".")
    )
    assert violations == []


def test_pure_layers_load_without_torch_kopf_or_kubernetes() -> None:
    code = (
        "import sys, pretrain_trainer.config, pretrain_trainer.contract, pretrain_operator.api, "
        "pretrain_operator.crd, pretrain_operator.plan\n"
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
