"""Writing an export: safetensors files sharded by size, and a directory that appears whole.

The weights go to ``model.safetensors``, or, above ``max_shard_size``, to
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` (Hugging Face's
names and index format; a tensor larger than the limit gets a shard of its own). Everything
is written into a temporary sibling of the output directory, renamed into place at the end,
and removed on any failure: an export is either complete or absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

DEFAULT_SHARD_SIZE = "5GB"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in ``5GB`` (decimal, as Hugging Face counts), ``512MiB`` (binary) or ``1000``."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = found[2].upper() if found else ""
    if found is None or unit not in _UNITS or float(found[1]) * _UNITS[unit] < 1:
        raise ValueError(f"{text!r} is not a size (like 5GB, 500MiB or a number of bytes)")
    return int(float(found[1]) * _UNITS[unit])


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_shards(tensors: Mapping[str, torch.Tensor], *, max_bytes: int) -> list[list[str]]:
    """Tensor names per shard, in order: each shard is filled until the next tensor would
    take it past ``max_bytes``."""
    shards: list[list[str]] = []
    size = 0
    for name, tensor in tensors.items():
        if not shards or (size + _nbytes(tensor) > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(tensor)
    return shards


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], directory: Path, *, dtype: torch.dtype, max_bytes: int
) -> list[str]:
    """Write ``tensors`` (as ``dtype``, each its own contiguous copy) into ``directory``;
    returns the file names written."""
    from safetensors.torch import save_file

    copies = {
        n: t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
        for n, t in tensors.items()
    }
    shards = plan_shards(copies, max_bytes=max_bytes)
    if len(shards) == 1:
        save_file(copies, str(directory / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for file, names in zip(files, shards, strict=True):
        save_file({n: copies[n] for n in names}, str(directory / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(_nbytes(t) for t in copies.values())
    write_json(directory / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return [*files, INDEX]


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` to write into; renamed to ``out`` when the block
    succeeds, removed when it fails (``out`` must not exist, its parent must)."""
    temporary = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield temporary
        if out.exists():  # created meanwhile: never replace it
            raise FileExistsError(f"{out} appeared while the export was written")
        os.rename(temporary, out)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
