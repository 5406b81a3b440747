"""Where a job's checkpoints lie: every path and name pattern of the store, in one place.

Layout under a job's root (docs/design.md, "Checkpoints")::

    <root>/latest                               "stage-1/step-40", replaced atomically
    <root>/stage-<s>/step-<n>/...               DeepSpeed's files, any names, subfolders allowed
    <root>/stage-<s>/step-<n>/rng/rank-<r>.pt   each rank's RNG state
    <root>/stage-<s>/step-<n>/weights/rank-<r>.pt  final checkpoints: fp32 weights, by rank
    <root>/stage-<s>/step-<n>/tokenizer/<file>  the data's tokenizers JSON file, when known
    <root>/stage-<s>/step-<n>/universal/        added by a restore at another world size
    <root>/stage-<s>/step-<n>/.rank-<r>.json    rank markers, until the manifest is written
    <root>/stage-<s>/step-<n>/manifest.json     written last: the checkpoint now exists

Pure names and paths: nothing here touches the filesystem. Standard library only, so the
control plane (``pretrainctl checkpoints``) can import it without the trainer's dependencies.
"""

from __future__ import annotations

import re
from pathlib import Path

MANIFEST = "manifest.json"
LATEST = "latest"
WEIGHTS = "weights"
RNG = "rng"
TOKENIZER = "tokenizer"
UNIVERSAL = "universal"
CORRUPT_SUFFIX = ".corrupt"

_INDEX = r"(0|[1-9][0-9]*)"  # no leading zeros: one directory per number
STAGE_PATTERN = re.compile(rf"stage-{_INDEX}")
STEP_PATTERN = re.compile(rf"step-{_INDEX}")
RANK_MARKER_PATTERN = re.compile(rf"\.rank-{_INDEX}\.json")
STAGE_GLOB, STEP_GLOB, RANK_MARKER_GLOB = "stage-*", "step-*", ".rank-*.json"
RANK_FILE_GLOB = "rank-*.pt"  # every rank_file of one folder
PART_SUFFIX = ".part"  # a file still being received from a peer
# The files one rank alone reads back at the same world size: DeepSpeed's ZeRO partitions
# (``zero_pp_rank_<r>_mp_rank_00_*``, ``bf16_zero_pp_rank_<r>_...``) and our rank files.
_RANK_OWNED = re.compile(rf"(?:^|/|_)zero_pp_rank_{_INDEX}_|(?:^|/)rank-{_INDEX}\.pt$")


def stage_name(stage: int) -> str:
    return f"stage-{stage}"


def step_name(step: int) -> str:
    """A checkpoint directory's name inside its stage's (DeepSpeed's ``tag``)."""
    return f"step-{step}"


def checkpoint_name(*, stage: int, step: int) -> str:
    """A checkpoint's path relative to the root, as ``latest`` and listings spell it."""
    return f"{stage_name(stage)}/{step_name(step)}"


def stage_dir(root: Path, stage: int) -> Path:
    return root / stage_name(stage)


def checkpoint_dir(root: Path, *, stage: int, step: int) -> Path:
    return stage_dir(root, stage) / step_name(step)


def stage_of(name: str) -> int | None:
    """The stage a directory name says, or None when it is not a stage directory."""
    found = STAGE_PATTERN.fullmatch(name)
    return int(found[1]) if found else None


def step_of(name: str) -> int | None:
    """The step a directory name says, or None when it is not a step directory."""
    found = STEP_PATTERN.fullmatch(name)
    return int(found[1]) if found else None


def rank_marker_name(rank: int) -> str:
    return f".rank-{rank}.json"


def is_rank_marker(name: str) -> bool:
    return RANK_MARKER_PATTERN.fullmatch(name) is not None


def rank_file(folder: str, rank: int) -> str:
    """A per-rank file of a checkpoint (``rng/rank-0.pt``), relative to its directory."""
    return f"{folder}/rank-{rank}.pt"


def file_rank(path: str) -> int | None:
    """The rank that alone reads ``path`` (relative to its checkpoint) back at the world size
    it was written at; None for a file every rank reads (DeepSpeed's module states). The
    tokenizer is rank 0's: no rank reads it back, and rank 0 wrote it."""
    if path.startswith(f"{TOKENIZER}/"):
        return 0
    found = _RANK_OWNED.search(path)
    if found is None:
        return None
    return int(found[1] if found[1] is not None else found[2])


def quarantined(directory: Path) -> Path:
    """Where a checkpoint that failed verification is kept for inspection."""
    return directory.with_name(directory.name + CORRUPT_SUFFIX)


def probe_name(name: str) -> str:
    """The file a writability check creates and removes at the root."""
    return f".probe-{name}"
