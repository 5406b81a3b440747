"""Reading PretrainJob manifests from files, with one-line errors instead of tracebacks."""

from __future__ import annotations

from pathlib import Path

import yaml
from pretrain_trainer.config import SpecError

from .api import PretrainJob, parse_job


class ManifestError(Exception):
    """A file that cannot be read as YAML at all (missing, unreadable, bad syntax)."""


def read_documents(path: Path) -> list[object]:
    """All YAML documents in ``path`` (empty documents skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ManifestError(f"{path}: cannot read: {reason}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ManifestError(f"{path}{where}: YAML syntax error: {problem}") from None
    if not docs:
        raise ManifestError(f"{path}: no YAML document in the file")
    return docs


def load_job(path: Path) -> PretrainJob:
    """The single PretrainJob in ``path``; raises ManifestError or SpecError."""
    docs = read_documents(path)
    if len(docs) != 1:
        raise ManifestError(f"{path}: expected one PretrainJob, found {len(docs)} documents")
    return parse_job(docs[0])


__all__ = ["ManifestError", "SpecError", "load_job", "read_documents"]
