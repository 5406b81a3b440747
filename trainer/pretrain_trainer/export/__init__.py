"""Exporting a checkpoint for use outside this project: ``pretrainctl export CHECKPOINT
--format hf --out DIR`` (docs/design.md, "Export").

:mod:`.checkpoint` reads a verified checkpoint and its full fp32 weights, :mod:`.hf` maps them
to Hugging Face's Llama / Mixtral layout, :mod:`.files` writes safetensors shards into a
directory that appears whole, and :mod:`.command` ties them together
(:func:`export_checkpoint`) and is the command line. Importing this package loads no torch.
"""

from .command import Exported, add_arguments, export_checkpoint, main, run

__all__ = ["Exported", "add_arguments", "export_checkpoint", "main", "run"]
