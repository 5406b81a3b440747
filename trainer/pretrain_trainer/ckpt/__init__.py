"""Checkpoints (docs/design.md, "Checkpoints").

Torch-free: :mod:`.layout` (paths and names), :mod:`.manifest` (what a checkpoint holds),
:mod:`.hashing` (crc32 while writing and reading), :mod:`.store` (``latest``, rank markers,
refused storage) and :mod:`.catalog` (listing, verification, choosing, retention). The
DeepSpeed side, :mod:`.engine` (the background writer), :mod:`.restore` (choosing and loading
a checkpoint) and :mod:`.manager` (a stage's restore and saves), is imported explicitly, so
this package never pulls in torch.
"""

from ..fsio import write_json_atomic
from .catalog import (
    Checkpoint,
    Verification,
    clean_incomplete,
    incomplete,
    list_checkpoints,
    newest_valid,
    prune,
    retention,
    verify,
)
from .hashing import CHUNK, HashingFile, crc32_file
from .layout import LATEST, MANIFEST, checkpoint_dir, checkpoint_name, stage_dir
from .manifest import (
    MANIFEST_VERSION,
    CheckpointError,
    FileRecord,
    Manifest,
    config_hash,
    read_manifest,
    utc_now,
    write_manifest,
)
from .store import (
    StorageError,
    check_writable,
    collect_rank_markers,
    read_latest,
    remove_rank_markers,
    set_latest,
    write_rank_marker,
)

__all__ = [
    "CHUNK",
    "LATEST",
    "MANIFEST",
    "MANIFEST_VERSION",
    "Checkpoint",
    "CheckpointError",
    "FileRecord",
    "HashingFile",
    "Manifest",
    "StorageError",
    "Verification",
    "check_writable",
    "checkpoint_dir",
    "checkpoint_name",
    "clean_incomplete",
    "collect_rank_markers",
    "config_hash",
    "crc32_file",
    "incomplete",
    "list_checkpoints",
    "newest_valid",
    "prune",
    "read_latest",
    "read_manifest",
    "remove_rank_markers",
    "retention",
    "set_latest",
    "stage_dir",
    "utc_now",
    "verify",
    "write_json_atomic",
    "write_manifest",
    "write_rank_marker",
]
