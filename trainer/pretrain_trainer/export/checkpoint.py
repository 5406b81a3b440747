"""What an export reads: a verified checkpoint, the model it holds, and its full fp32 weights.

A checkpoint explains itself through its manifest's ``extra``
(:func:`~pretrain_trainer.ckpt.manager.recorded_facts`: the model, the stage's layout,
precision, frozen prefixes and tokenizer); one written before those were recorded needs the
job's config (``--config``: a run config or a PretrainJob). The weights come from one of two
places:

- A stage's *final* checkpoint holds ``weights/rank-<r>.pt``: the full fp32 weights under the
  model's own names, sharded by parameter over the ranks, whatever the layout and ZeRO stage.
- Any other checkpoint holds only DeepSpeed's files. Under a data-parallel-only layout,
  DeepSpeed's offline reader (``zero_to_fp32``) merges the fp32 partitions of ZeRO 1, 2 and 3
  at any world size; ZeRO 0 keeps whole weights in its module states file, and under bf16 the
  fp32 masters in the optimizer's groups there. Tensor, pipeline and expert layouts cut the
  model in ways that reader does not undo (pipeline files per layer, DeepSpeed's MoE layer's
  expert files), so those are refused, pointing at the stage's final checkpoint.

No process group is needed: everything is read from files, on the CPU.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from ..ckpt.catalog import verify
from ..ckpt.layout import MANIFEST, RANK_FILE_GLOB, TOKENIZER, WEIGHTS
from ..ckpt.manifest import CheckpointError, Manifest, read_manifest
from ..config import ModelConfig, Parallelism, RunConfig, SpecError
from ..errors import PermanentError
from ..model import Transformer

MODULE_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's, of a data-parallel layout


class ExportError(PermanentError):
    """The checkpoint (or the request) cannot be exported; the message is one line."""


@dataclass(frozen=True)
class Facts:
    """What the stage that wrote a checkpoint trained, and how."""

    model: ModelConfig
    parallelism: Parallelism
    precision: str
    freeze: tuple[str, ...]
    tokenizer: str | None
    """The tokenizer's name in the token shards' headers (``byte`` or a file name)."""
    eos_id: int | None


@dataclass(frozen=True)
class Source:
    """A checkpoint whose checksums verified, and what it holds."""

    directory: Path
    manifest: Manifest
    facts: Facts

    @property
    def name(self) -> str:
        return f"stage-{self.manifest.stage}/step-{self.manifest.step}"

    @property
    def tokenizer_file(self) -> Path | None:
        """The tokenizers JSON file the checkpoint carries, or None."""
        listed = [f.path for f in self.manifest.files if f.path.startswith(f"{TOKENIZER}/")]
        return self.directory / listed[0] if listed else None


def read_config(path: Path) -> RunConfig:
    """The run config in ``path``: a run config itself, or a PretrainJob's spec (only the
    run config's fields of it are read; ``pretrainctl validate`` checks the rest)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise ExportError(f"{path}: cannot read: {getattr(error, 'strerror', error)}") from None
    except yaml.YAMLError as error:
        raise ExportError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    if isinstance(raw, dict) and raw.get("kind") == "PretrainJob":
        spec = raw.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        wanted = {field.alias or name for name, field in RunConfig.model_fields.items()}
        raw = {key: value for key, value in spec.items() if key in wanted}
    try:
        return RunConfig.parse(raw)
    except SpecError as error:
        more = f" (and {len(error.problems) - 1} more)" if len(error.problems) > 1 else ""
        raise ExportError(f"{path}: invalid run config: {error.problems[0]}{more}") from None


def _recorded(manifest: Manifest) -> Facts | None:
    extra = manifest.extra
    if "model" not in extra:
        return None
    tokenizer = extra.get("tokenizer") or {}
    try:
        return Facts(
            model=ModelConfig.model_validate(extra["model"]),
            parallelism=Parallelism.model_validate(extra.get("parallelism") or {}),
            precision=str(extra.get("precision", "fp32")),
            freeze=tuple(extra.get("freeze") or ()),
            tokenizer=tokenizer.get("name"),
            eos_id=tokenizer.get("eosId"),
        )
    except ValidationError as error:
        raise ExportError(f"{MANIFEST} records an unreadable model: {error}") from None


def _from_config(manifest: Manifest, config: RunConfig) -> Facts:
    if manifest.stage >= len(config.stages) or (
        config.stages[manifest.stage].name != manifest.stage_name
    ):
        raise ExportError(
            f"the checkpoint is of stage {manifest.stage} ({manifest.stage_name!r}), which the "
            "config does not have at that index: not this job's config"
        )
    stage = config.stages[manifest.stage]
    return Facts(config.model, stage.parallelism, stage.precision, tuple(stage.freeze), None, None)


def open_checkpoint(directory: Path, *, config: RunConfig | None = None) -> Source:
    """The checkpoint in ``directory``, its files' sizes and crc32 checked against its
    manifest; the model from the manifest, else from ``config``."""
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such checkpoint directory")
    try:
        manifest = read_manifest(directory)
    except CheckpointError as error:
        raise ExportError(f"not a checkpoint: {error}") from None
    checked = verify(directory, manifest, checksums=True)
    if not checked.ok:
        raise ExportError(f"{directory} is corrupt: {'; '.join(checked.problems)}")
    facts = _recorded(manifest)
    if facts is not None and config is not None and config.model != facts.model:
        raise ExportError(f"{directory} records another model than the config given")
    if facts is None:
        if config is None:
            raise ExportError(
                f"{directory}: its manifest records no model (an older checkpoint); "
                "pass the job's config with --config FILE"
            )
        facts = _from_config(manifest, config)
    return Source(directory, manifest, facts)


def expected_shapes(model: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter of the model, tied ones once, and its shape (built without memory)."""
    with torch.device("meta"):
        built = Transformer(model)
    return {name: param.shape for name, param in built.named_parameters()}


def full_weights(source: Source) -> dict[str, torch.Tensor]:
    """The checkpoint's fp32 weights under the model's names, tied parameters once, checked
    against the model's parameters and shapes."""
    final = any(f.path.startswith(f"{WEIGHTS}/") for f in source.manifest.files)
    state = saved_weights(source) if final else engine_weights(source)
    expected = expected_shapes(source.facts.model)
    missing = sorted(set(expected) - set(state))
    wrong = sorted(n for n in expected.keys() & state.keys() if state[n].shape != expected[n])
    if missing or wrong:
        raise ExportError(
            f"{source.directory} does not hold the model it records: missing {missing[:3]}, "
            f"shapes differ for {wrong[:3]}"
        )
    return {name: state[name].float() for name in expected}


def saved_weights(source: Source) -> dict[str, torch.Tensor]:
    """A final checkpoint's ``weights/rank-*.pt``, merged."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted((source.directory / WEIGHTS).glob(RANK_FILE_GLOB)):
        state.update(torch.load(shard, map_location="cpu", mmap=True, weights_only=True))
    return state


def engine_weights(source: Source) -> dict[str, torch.Tensor]:
    """The fp32 weights in DeepSpeed's own files (any checkpoint of a data-parallel-only
    layout, at the world size and ZeRO stage it was written with)."""
    layout = source.facts.parallelism
    layered = any(f.path.startswith(("layer_", "expert_")) for f in source.manifest.files)
    if not layout.trivial or layered:
        raise ExportError(
            f"{source.directory} is a step checkpoint of a tensor/pipeline/expert layout, whose "
            "DeepSpeed files the offline reader cannot merge; export the stage's final "
            "checkpoint (it holds the full weights)"
        )
    if source.manifest.zero_stage == 0:
        return _zero0_weights(source)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # it prints its progress
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            state: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(
                str(source.directory.parent), tag=source.directory.name
            )
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError) as error:
        raise ExportError(f"{source.directory}: DeepSpeed's reader failed: {error}") from None
    return state


def _zero0_weights(source: Source) -> dict[str, torch.Tensor]:
    """Without ZeRO the module states file holds every weight whole, in the training dtype;
    under bf16 its optimizer keeps the fp32 masters of the trainable parameters as two
    groups in ``optim.param_groups`` order (matrices, then vectors)."""
    path = source.directory / MODULE_STATES
    try:
        states: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError) as error:
        raise ExportError(f"{path}: cannot read DeepSpeed's module states: {error}") from None
    weights = {name: tensor.float() for name, tensor in states["module"].items()}
    groups = (states.get("optimizer") or {}).get("fp32_groups")
    if groups is None:  # fp32 training: the module's weights are the masters
        return weights
    names = [
        name
        for name in expected_shapes(source.facts.model)
        if not any(name == p or name.startswith(p + ".") for p in source.facts.freeze)
    ]
    order = [n for n in names if weights[n].dim() >= 2] + [n for n in names if weights[n].dim() < 2]
    masters = [tensor for group in groups for tensor in group]
    if len(masters) != len(order) or any(
        m.shape != weights[n].shape for n, m in zip(order, masters, strict=False)
    ):
        raise ExportError(f"{path}: the optimizer's fp32 groups do not match the model")
    weights.update({name: master.float() for name, master in zip(order, masters, strict=True)})
    return weights
