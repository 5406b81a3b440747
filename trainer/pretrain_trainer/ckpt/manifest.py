"""The manifest: what a complete checkpoint holds, and the one file that makes it exist.

A checkpoint directory without a valid manifest does not exist: the manifest is written only
after every file is on disk, by an atomic rename, so a crash at any moment leaves either a
complete checkpoint or an incomplete directory that readers skip and ``clean_incomplete``
removes. It records every file's size and crc32, so a torn or bit-rotted checkpoint is
detected before it is loaded (see ``catalog``).

Torch-free: the control plane reads manifests to list and verify checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from ..config.base import Spec
from ..fsio import fsync_dir, write_json_atomic
from .layout import MANIFEST

MANIFEST_VERSION = 1

NonNegative = Annotated[int, Field(ge=0)]


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete or corrupt; the message names the directory.

    Not permanent: the caller falls back to an older checkpoint, or a retry does."""


class FileRecord(Spec):
    """One file of a checkpoint: where it lies inside the checkpoint directory, and its bytes."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]
    """Relative POSIX path inside the checkpoint directory."""
    size: NonNegative
    """Size in bytes."""
    crc32: Annotated[int, Field(ge=0, le=2**32 - 1)]
    """zlib.crc32 of the whole file."""

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        # The path is joined to the directory and opened: never let a manifest point outside it.
        pure = PurePosixPath(value)
        if pure.is_absolute() or ".." in pure.parts or str(pure) != value or "\\" in value:
            raise ValueError(f"{value!r} is not a normalised relative POSIX path")
        return value


class Manifest(Spec):
    """What a complete checkpoint holds; its presence is what makes the checkpoint exist."""

    version: int = MANIFEST_VERSION
    """Layout version; readers refuse versions they do not know."""
    job: str
    stage: NonNegative
    stage_name: str
    step: NonNegative
    tokens: NonNegative
    """Training tokens consumed in the stage up to this step."""
    world_size: Annotated[int, Field(ge=1)]
    zero_stage: Annotated[int, Field(ge=0, le=3)]
    config_hash: str
    """``config_hash`` of the run configuration that wrote the checkpoint."""
    final: bool
    """The stage's last checkpoint: kept forever, and the next stage starts from it."""
    saved_at: str
    """ISO 8601 UTC time of the save (:func:`utc_now`)."""
    sampler: dict[str, Any]
    """The data sampler's state (opaque JSON)."""
    files: list[FileRecord]
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _known(self) -> Manifest:
        if self.version != MANIFEST_VERSION:
            raise ValueError(f"manifest version {self.version} is not {MANIFEST_VERSION}")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists a path twice")
        return self

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def saved_timestamp(self) -> float | None:
        """``saved_at`` as Unix time, or None when it does not parse."""
        try:
            return datetime.fromisoformat(self.saved_at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None


def utc_now() -> str:
    """A ``savedAt`` value: ISO 8601 UTC, second precision, ``Z`` for the zone."""
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def config_hash(data: object) -> str:
    """sha256 of canonical JSON, so that equal configurations hash equally whatever the key
    order. A pydantic model is dumped by alias first (the wire form)."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", by_alias=True)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Commit a checkpoint: sync every directory entry beneath it, then write the manifest."""
    for sub, _, _ in os.walk(directory):
        fsync_dir(Path(sub))
    write_json_atomic(directory / MANIFEST, manifest.model_dump(mode="json", by_alias=True))


def read_manifest(directory: Path) -> Manifest:
    """The manifest of ``directory``; :class:`CheckpointError` naming the directory and why
    when there is none or it is not one this version can trust."""
    path = directory / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete checkpoint)") from None
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot read {MANIFEST}: {e}") from e
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{directory}: {MANIFEST} is not JSON: {e}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise CheckpointError(f"{directory}: invalid {MANIFEST}: {where}") from None
