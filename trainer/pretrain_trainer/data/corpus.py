"""A real two-source corpus from the Python standard library, for demos and tests.

Every machine that runs the trainer has a Python standard library: it is real text, needs no
download, and splits naturally into two sources of different character, which is what a
multi-stage data mix needs to show an effect:

``code``
    The source of the standard library's modules (tests and site-packages left out).
``prose``
    The module, class and function docstrings of the same files, extracted with :mod:`ast`:
    English with some markup.

Files are visited in sorted path order, so the corpus is the same on every run on a given
Python installation. The code source stops at :data:`CODE_BYTES` (the whole library is ~12 MB
of source); the prose source takes the docstrings of every visited file (~2 MB in total).
"""

from __future__ import annotations

import ast
import shutil
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator
from pathlib import Path

from .prepare import prepare

CODE_BYTES = 4 << 20
SPLIT_EVAL = 0.02  # of each source's documents, held out
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_files(*, root: Path | None = None) -> Iterator[tuple[Path, Path]]:
    """(absolute path, path relative to the library) of every stdlib module, sorted."""
    base = root or Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base)
        if not SKIPPED_DIRS & set(relative.parts[:-1]) and path.is_file():
            yield path, relative


def docstrings(source: str) -> str | None:
    """The docstrings of a module and of its classes and functions, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old escapes in docstrings warn on newer Pythons
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return None
    found = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, _DOCUMENTED)]
    texts = [text for text in found if text]
    return "\n\n".join(texts) + "\n" if texts else None


def _read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as file:  # honours `# -*- coding: ... -*-` declarations
            return file.read()
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None


def _fresh(directory: Path) -> Path:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def build_stdlib_corpus(
    out: Path, *, max_files: int | None = None, split_eval: float = SPLIT_EVAL
) -> dict[str, Path]:
    """Write ``out/text/{code,prose}/`` and their byte-level shards ``out/{code,prose}/``,
    each with a held-out ``split_eval`` of its documents in ``out/{code,prose}/eval/`` (for
    ``DataConfig.evalSources``).

    ``max_files`` bounds the modules visited (a small corpus for tests). Returns the shard
    directories by source name, ready for ``DataConfig.sources``. The text and shard
    directories are replaced on every call.
    """
    text = {name: _fresh(out / "text" / name) for name in ("code", "prose")}
    code_bytes = 0
    for index, (path, relative) in enumerate(stdlib_files()):
        if max_files is not None and index >= max_files:
            break
        source = _read_source(path)
        if source is None or "\0" in source:
            continue
        if code_bytes < CODE_BYTES:
            target = text["code"] / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source, encoding="utf-8")
            code_bytes += len(source.encode("utf-8"))
        prose = docstrings(source)
        if prose:
            target = (text["prose"] / relative).with_suffix(".txt")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(prose, encoding="utf-8")
    shards = {}
    for name, directory in text.items():
        shards[name] = _fresh(out / name)
        prepare([directory], shards[name], tokenizer="byte", name=name, split_eval=split_eval)
    return shards
