"""``export``: one checkpoint to a Hugging Face model directory.

:func:`export_checkpoint` is what callers use (``pretrainctl export``, ``python -m
pretrain_trainer export``, later a short-lived pod the operator starts with the trainer
image). :func:`add_arguments` and :func:`run` are the command line both entry points share.
This module imports neither torch nor DeepSpeed until an export runs, so ``pretrainctl``
can build its parser on a machine without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import RunConfig
from ..errors import PermanentError

if TYPE_CHECKING:
    import torch

    from .checkpoint import Source

FORMATS = ("hf",)
PROVENANCE = "export.json"
"""Written into every export: the checkpoint it came from (job, stage, step, when it was saved,
its config hash) and how it was written, so an export can always be traced back, and a rerun
with ``keep_existing`` knows it is already done."""
DTYPES = ("fp32", "bf16")
EXIT_OK, EXIT_INVALID = 0, 2


@dataclass(frozen=True)
class Exported:
    """What :func:`export_checkpoint` wrote."""

    directory: Path
    checkpoint: str
    """``stage-<s>/step-<n>``."""
    architecture: str
    files: list[str]
    bytes: int
    tokenizer: bool
    """Whether a tokenizer was exported beside the model."""


def export_checkpoint(
    checkpoint: Path,
    *,
    out: Path,
    format: str = "hf",
    dtype: str = "fp32",
    max_shard_size: str = "5GB",
    config: RunConfig | Path | None = None,
    keep_existing: bool = False,
    log: Callable[[str], None] = print,
) -> Exported | None:
    """Export the checkpoint directory ``checkpoint`` (``<root>/<job>/stage-<s>/step-<n>``)
    to the new directory ``out`` as ``format`` (``hf``: safetensors weights in ``dtype``,
    config.json, generation_config.json and, when the checkpoint carries one, the tokenizer).
    ``config``: the job's run config (or a file holding it or its PretrainJob), needed only
    for checkpoints whose manifest records no model. ``keep_existing``: an ``out`` that
    already holds this checkpoint's export, written the same way (its ``export.json`` says
    so), is kept and None returned (a retried export pod). Raises :class:`ExportError` (one
    line) for bad input; ``out`` is then left absent."""
    from .checkpoint import ExportError, full_weights, open_checkpoint, read_config

    if format not in FORMATS:
        raise ExportError(f"unknown --format {format!r} (known: {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise ExportError(f"unknown --dtype {dtype!r} (known: {', '.join(DTYPES)})")
    from .files import parse_size

    try:
        max_bytes = parse_size(max_shard_size)
    except ValueError as error:
        raise ExportError(f"--max-shard-size: {error}") from None
    if isinstance(config, Path):
        config = read_config(config)
    source = None
    if keep_existing and (out / PROVENANCE).is_file():
        source = open_checkpoint(checkpoint, config=config)
        if _provenance_of(out) == provenance(source, format=format, dtype=dtype):
            log(f"{out} already holds the export of {source.name}: kept")
            return None
    if out.exists() or out.is_symlink():
        raise ExportError(f"{out} already exists; give a new directory to export into")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such directory to export into")
    source = source or open_checkpoint(checkpoint, config=config)
    state = full_weights(source)
    try:
        return _write_hf(
            source,
            state,
            out=out,
            dtype=dtype,
            max_bytes=max_bytes,
            log=log,
            written=provenance(source, format=format, dtype=dtype),
        )
    except FileExistsError as error:
        raise ExportError(str(error)) from None


def _write_hf(
    source: Source,
    state: dict[str, torch.Tensor],
    *,
    out: Path,
    dtype: str,
    max_bytes: int,
    log: Callable[[str], None],
    written: dict[str, object],
) -> Exported:
    from .files import staged, write_json, write_safetensors
    from .hf import DTYPES as TORCH_DTYPES
    from .hf import generation_config, hf_config, hf_weights, tokenizer_config

    model, facts = source.facts.model, source.facts
    config = hf_config(model, dtype=dtype, eos_id=facts.eos_id)
    with staged(out) as directory:
        files = write_safetensors(
            hf_weights(model, state), directory, dtype=TORCH_DTYPES[dtype], max_bytes=max_bytes
        )
        write_json(directory / "config.json", config)
        write_json(directory / "generation_config.json", generation_config(eos_id=facts.eos_id))
        write_json(directory / PROVENANCE, written)
        files += ["config.json", "generation_config.json", PROVENANCE]
        tokenizer = source.tokenizer_file
        if tokenizer is not None:
            text = tokenizer.read_text(encoding="utf-8")
            (directory / "tokenizer.json").write_text(text, encoding="utf-8")
            write_json(
                directory / "tokenizer_config.json",
                tokenizer_config(text, eos_id=facts.eos_id, seq_len=model.seq_len),
            )
            files += ["tokenizer.json", "tokenizer_config.json"]
        size = sum((directory / f).stat().st_size for f in files)
    exported = Exported(out, source.name, config["architectures"][0], files, size, bool(tokenizer))
    origin = "final weights" if source.manifest.final else "DeepSpeed's files"
    log(
        f"exported {exported.checkpoint} ({origin}) to {out}: {exported.architecture}, "
        f"{dtype}, {len(files)} files, {size / 1e6:.1f} MB"
    )
    if tokenizer is None:
        log(_no_tokenizer(facts.tokenizer))
    return exported


def provenance(source: Source, *, format: str, dtype: str) -> dict[str, object]:
    """What an export's ``export.json`` says: where it came from and how it was written."""
    manifest = source.manifest
    return {
        "job": manifest.job,
        "checkpoint": source.name,
        "stage": manifest.stage,
        "stageName": manifest.stage_name,
        "step": manifest.step,
        "savedAt": manifest.saved_at,
        "configHash": manifest.config_hash,
        "format": format,
        "dtype": dtype,
    }


def _provenance_of(out: Path) -> object:
    try:
        return json.loads((out / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _no_tokenizer(name: str | None) -> str:
    if name == "byte":
        return "no tokenizer exported: the data was tokenized as UTF-8 bytes (ids 0-255, eos 0)"
    if name is None:
        return "no tokenizer exported: the checkpoint does not say which tokenizer its data used"
    return f"no tokenizer exported: the checkpoint does not carry {name} (prepare kept no copy)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The export command's arguments (``pretrainctl export`` and ``python -m
    pretrain_trainer export``)."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new directory")
    # Checked by export_checkpoint, not by argparse: a bad value is one line, as every error.
    parser.add_argument("--format", default="hf", help="hf (the only one yet)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (as stored, default) or bf16")
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors file before the weights are sharded (default: 5GB)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the job's run config or PretrainJob, for checkpoints that do not record the model",
    )
    parser.add_argument(
        "--keep-existing",
        action="store_true",
        help=f"succeed, keeping DIR, when it already holds this checkpoint's export written "
        f"the same way (its {PROVENANCE} says so)",
    )


def run(args: argparse.Namespace) -> int:
    """Run a parsed export command: 0, or 2 after one line on stderr."""
    try:
        import safetensors  # noqa: F401 - a trainer dependency: say so before any work
        import torch  # noqa: F401
    except ImportError as error:
        _error(
            f"error: {error}; install the trainer extra: pip install 'pretrain-operator[trainer]'"
        )
        return EXIT_INVALID
    try:
        export_checkpoint(
            Path(args.checkpoint),
            out=Path(args.out),
            format=args.format,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            config=Path(args.config) if args.config else None,
            keep_existing=args.keep_existing,
        )
    except (PermanentError, OSError) as error:
        _error(f"error: {error}")
        return EXIT_INVALID
    return EXIT_OK


def _error(line: str) -> None:
    print(" ".join(line.split()), file=sys.stderr, flush=True)  # one line, whatever it quotes


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pretrain_trainer export ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m pretrain_trainer export",
        description="Export a checkpoint as a Hugging Face model directory.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
