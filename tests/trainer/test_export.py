"""`pretrainctl export` from checkpoints the real trainer wrote (DeepSpeed on CPU): the
exported model, loaded by transformers, computes what ours computes; bad input is one line,
exit 2 and no output."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pretrain_operator.cli import main as pretrainctl
from pretrain_trainer.config import RunConfig
from pretrain_trainer.data import prepare
from pretrain_trainer.export.checkpoint import (
    engine_weights,
    full_weights,
    open_checkpoint,
    read_config,
    saved_weights,
)
from pretrain_trainer.export.files import parse_size
from pretrain_trainer.model import Transformer

from tests.support.hf import assert_same_model, prompt
from tests.trainer.harness import run_trainer, stage

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

pytestmark = pytest.mark.slow

WORDS = [
    *("the", "a", "model", "learns", "tokens", "from", "text", "and", "every", "stage"),
    *("trains", "on", "mix", "of", "sources", "while", "workers", "come", "go"),
    *("checkpoints", "carry", "job", "across", "failures", "resizes", "stages"),
]
EOS = "</s>"


def _documents(directory: Path, *, count: int = 40) -> Path:
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for i in range(count):
        words = [rng.choice(WORDS) for _ in range(120)]
        (directory / f"doc-{i:02d}.txt").write_text(" ".join(words) + "\n")
    return directory


def _word_tokenizer(path: Path, texts: Path) -> Path:
    """A WordLevel tokenizers file trained on the documents, with an end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", EOS])
    tokenizer.train([str(p) for p in sorted(texts.iterdir())], trainer)
    tokenizer.save(str(path))
    return path


def _config(data: Path, model: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "model": {"layers": 2, "hidden": 64, "heads": 4, "seqLen": 64, **model},
        "data": {"sources": [{"name": "text", "path": str(data)}]},
        "stages": [stage(budget={"steps": 4}, dataMix={"text": 1}, **fields)],
        "checkpoint": {"intervalSteps": 2, "keep": 5},
        "trainer": {"logEverySteps": 5, "spikeFactor": 0.0},
    }


class Trained:
    """A finished one-stage run: its config and its checkpoints."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir, self.config = workdir, RunConfig.parse(config)

    def checkpoint(self, step: int) -> Path:
        return self.workdir / "checkpoints" / "test" / "stage-0" / f"step-{step}"


def _train(workdir: Path, config: dict[str, Any], *, nproc: int) -> Trained:
    run = run_trainer(workdir, config, nproc=nproc, torchrun=nproc > 1)
    assert run.returncode == 0, run.stderr[-3000:]
    return Trained(workdir, config)


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _documents(tmp_path_factory.mktemp("docs") / "text")


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory, documents: Path) -> Trained:
    """Dense, grouped-query attention, tied embeddings; 2 ranks, ZeRO 1, fp32, bytes."""
    work = tmp_path_factory.mktemp("dense")
    prepare([documents], work / "data")
    model = {"kvHeads": 2, "vocabSize": 256, "tieEmbeddings": True}
    return _train(work, _config(work / "data", model, zeroStage=1, precision="fp32"), nproc=2)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory, documents: Path) -> Trained:
    """Mixtral-like, grouped-query attention; 1 rank, ZeRO 3, bf16, a WordLevel tokenizer."""
    work = tmp_path_factory.mktemp("moe")
    tokenizer = _word_tokenizer(work / "words.json", documents)
    prepare([documents], work / "data", tokenizer=str(tokenizer))
    model = {"kvHeads": 1, "vocabSize": 64, "moe": {"experts": 4, "topK": 2}}
    return _train(work, _config(work / "data", model, zeroStage=3, precision="bf16"), nproc=1)


def _export(checkpoint: Path, out: Path, *extra: str) -> None:
    assert (
        pretrainctl(["export", str(checkpoint), "--format", "hf", "--out", str(out), *extra]) == 0
    )


def _ours(trained: Trained, state: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(trained.config.model)
    model.load_state_dict(state, strict=False)  # tied: the head is the embedding
    return model.eval()


def _prompt(trained: Trained, rows: int = 2, length: int = 24) -> torch.Tensor:
    return prompt(trained.config.model.vocab_size, rows, length)


def _assert_same_model(trained: Trained, state: dict[str, torch.Tensor], out: Path) -> None:
    assert_same_model(_ours(trained, state), out)


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_an_exported_final_checkpoint_computes_our_logits_and_greedy_tokens(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    trained: Trained = request.getfixturevalue(model)
    _export(trained.checkpoint(4), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [
        "MixtralForCausalLM" if model == "moe" else "LlamaForCausalLM"
    ]
    assert config["tie_word_embeddings"] is (model == "dense")
    source = open_checkpoint(trained.checkpoint(4))
    _assert_same_model(trained, full_weights(source), tmp_path / "hf")


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_a_mid_stage_checkpoint_exports_from_deepspeeds_files(
    model: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    trained: Trained = request.getfixturevalue(model)
    step = open_checkpoint(trained.checkpoint(2))
    assert not step.manifest.final
    _export(trained.checkpoint(2), tmp_path / "hf")
    _assert_same_model(trained, engine_weights(step), tmp_path / "hf")


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_deepspeeds_files_hold_the_same_fp32_weights_as_the_final_ones(
    model: str, request: pytest.FixtureRequest
) -> None:
    """ZeRO 1 at world size 2 in fp32, ZeRO 3 at 1 in bf16: the offline reader's fp32
    masters are the weights the trainer gathered at the stage's end."""
    trained: Trained = request.getfixturevalue(model)
    final = open_checkpoint(trained.checkpoint(4))
    saved, merged = saved_weights(final), engine_weights(final)
    assert set(saved) <= set(merged)
    for name, tensor in saved.items():
        assert torch.equal(tensor, merged[name].float()), name


def test_without_zero_bf16_training_exports_its_fp32_masters(
    tmp_path: Path, documents: Path
) -> None:
    """ZeRO 0 keeps whole weights in DeepSpeed's module states (bf16 here) and the trainable
    ones' fp32 masters in its optimizer's groups; frozen ones train as bf16. The final
    checkpoint's weights are the module's today, the masters rounded to bf16."""
    prepare([documents], tmp_path / "data")
    config = _config(
        tmp_path / "data", {"vocabSize": 256}, zeroStage=0, precision="bf16", freeze=["layers.0"]
    )
    trained = _train(tmp_path / "run", config, nproc=1)
    final = open_checkpoint(trained.checkpoint(4))
    saved, masters = saved_weights(final), engine_weights(final)
    rounded = {n: m.bfloat16().float() for n, m in masters.items()}
    assert any(not torch.equal(masters[n], rounded[n]) for n in saved)  # fp32, not bf16
    for name, tensor in saved.items():  # the trainer saves the module's (bf16) weights
        assert torch.equal(tensor, masters[name]) or torch.equal(tensor, rounded[name]), name
    _export(trained.checkpoint(2), tmp_path / "hf")
    _assert_same_model(
        trained, engine_weights(open_checkpoint(trained.checkpoint(2))), tmp_path / "hf"
    )


def test_the_tokenizer_the_data_was_prepared_with_round_trips(moe: Trained, tmp_path: Path) -> None:
    assert (moe.workdir / "data" / "tokenizer" / "words.json").is_file()
    listed = [f.path for f in open_checkpoint(moe.checkpoint(2)).manifest.files]
    assert "tokenizer/words.json" in listed  # in every checkpoint, checksummed
    _export(moe.checkpoint(4), tmp_path / "hf")
    original = tokenizers.Tokenizer.from_file(str(moe.workdir / "words.json"))
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the model learns tokens from every stage"
    ids = original.encode(text, add_special_tokens=False).ids
    assert loaded(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.decode(ids) == original.decode(ids)
    assert loaded.eos_token == EOS
    config = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert config.eos_token_id == original.token_to_id(EOS)


def test_the_byte_tokenizer_is_said_not_exported(
    dense: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _export(dense.checkpoint(4), tmp_path / "hf")
    assert "no tokenizer exported" in capsys.readouterr().out
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 0


def test_weights_above_the_shard_size_are_sharded_with_an_index_that_loads(
    dense: Trained, tmp_path: Path
) -> None:
    _export(dense.checkpoint(4), tmp_path / "hf", "--max-shard-size", "100KB", "--dtype", "bf16")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert loaded.dtype == torch.bfloat16
    ours = _ours(dense, full_weights(open_checkpoint(dense.checkpoint(4))))
    prompt = _prompt(dense)
    with torch.no_grad():  # bf16 weights: close, not equal
        torch.testing.assert_close(
            loaded.float()(prompt).logits, ours(prompt), rtol=0.05, atol=0.05
        )


def test_a_checkpoint_that_records_no_model_exports_with_the_jobs_config(
    dense: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "step-2"
    shutil.copytree(dense.checkpoint(2), old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["extra"] = {"loss": manifest["extra"]["loss"]}  # as written before it recorded more
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert pretrainctl(["export", str(old), "--out", str(tmp_path / "no")]) == 2
    assert "--config" in capsys.readouterr().err
    job = {
        "apiVersion": "pretrain.dev/v1alpha1",
        "kind": "PretrainJob",
        "metadata": {"name": "test"},
        "spec": {"image": "trainer:test", **dense.config.model_dump(mode="json", by_alias=True)},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert read_config(tmp_path / "job.yaml") == dense.config
    _export(old, tmp_path / "hf", "--config", str(tmp_path / "job.yaml"))
    _assert_same_model(dense, engine_weights(open_checkpoint(dense.checkpoint(2))), tmp_path / "hf")


def _corrupt(source: Path, target: Path, how: str) -> Path:
    shutil.copytree(source, target)
    victim = target / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    if how == "truncated":
        del data[len(data) // 2 :]
    else:
        data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not a checkpoint", "not a checkpoint"),
        ("checksum mismatch", "crc32 mismatch"),
        ("truncated", "truncated"),
        ("unknown format", "unknown --format 'gguf'"),
        ("out exists", "already exists"),
        ("no such directory", "no such checkpoint directory"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output_directory(
    dense: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    checkpoint, out, extra = dense.checkpoint(2), tmp_path / "out" / "hf", []
    (tmp_path / "out").mkdir()
    if case == "not a checkpoint":
        checkpoint = tmp_path / "notes"
        checkpoint.mkdir()
        (checkpoint / "README").write_text("not a checkpoint\n")
    elif case in ("checksum mismatch", "truncated"):
        checkpoint = _corrupt(checkpoint, tmp_path / "step-2", case)
    elif case == "unknown format":
        extra = ["--format", "gguf"]
    elif case == "out exists":
        out.mkdir()
    elif case == "no such directory":
        checkpoint = tmp_path / "missing"
    argv = ["export", str(checkpoint), "--out", str(out), *extra]
    assert pretrainctl(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err
    assert err.startswith("error: ")
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == (["hf"] if case == "out exists" else [])  # no partial export, no temporary


def test_python_m_pretrain_trainer_export_runs_the_same_command(
    dense: Trained, tmp_path: Path
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain_trainer",
            "export",
            str(dense.checkpoint(4)),
            "--out",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "exported stage-0/step-4 (final weights)" in done.stdout
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_pipeline_step_checkpoint_is_refused_naming_the_final_one(
    tmp_path: Path, documents: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare([documents], tmp_path / "data")
    config = _config(
        tmp_path / "data", {"vocabSize": 256}, zeroStage=1, parallelism={"pipeline": 2}
    )
    trained = _train(tmp_path / "run", config, nproc=2)
    out = tmp_path / "out"
    assert pretrainctl(["export", str(trained.checkpoint(2)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "pipeline" in err
    assert "final checkpoint" in err
    assert not out.exists()
    _export(trained.checkpoint(4), out)  # the final one holds the full weights
    _assert_same_model(trained, full_weights(open_checkpoint(trained.checkpoint(4))), out)


@pytest.mark.parametrize(
    ("text", "size"),
    [("5GB", 5 * 10**9), ("100KB", 100_000), ("512MiB", 512 * 2**20), ("1000", 1000)],
)
def test_shard_sizes_read_as_hugging_face_writes_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5XB", "-1GB", "0"])
def test_a_shard_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


def test_keep_existing_keeps_only_an_export_of_the_same_checkpoint(
    dense: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a retried export pod relies on: a finished export of the same checkpoint, written
    the same way, is kept (exit 0, nothing rewritten); anything else in the way is refused."""
    out = tmp_path / "hf"
    _export(dense.checkpoint(4), out)
    provenance = json.loads((out / "export.json").read_text())
    assert (provenance["checkpoint"], provenance["step"], provenance["dtype"]) == (
        "stage-0/step-4",
        4,
        "fp32",
    )
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    _export(dense.checkpoint(4), out, "--keep-existing")
    assert "already holds the export of stage-0/step-4: kept" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    for other in ([str(dense.checkpoint(2))], [str(dense.checkpoint(4)), "--dtype", "bf16"]):
        code = pretrainctl(["export", *other, "--out", str(out), "--keep-existing"])
        assert code == 2
        assert "already exists" in capsys.readouterr().err
