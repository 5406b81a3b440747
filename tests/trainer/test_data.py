"""The data layer: shards on disk, text preparation, the stdlib corpus and the mixture sampler."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pretrain_operator.cli import main
from pretrain_trainer.config import BatchSplit
from pretrain_trainer.data import (
    DataError,
    MixtureSampler,
    build_stdlib_corpus,
    check_vocab,
    open_source,
    permutation,
    prepare,
    read_samples,
    write_shard,
)
from pretrain_trainer.data.prepare import held_out

from tests.conftest import ROOT

# ---------------------------------------------------------------------------- shards


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(256, "uint16"), (65536, "uint16"), (70000, "uint32")]
)
def test_shard_round_trips_tokens_in_the_narrowest_dtype(
    tmp_path: Path, vocab: int, dtype: str
) -> None:
    tokens = np.random.default_rng(0).integers(0, vocab, size=1000)
    header = write_shard(tmp_path / "s", tokens, vocab_size=vocab, tokenizer="byte", eos_id=0)
    meta = json.loads(header.read_text())
    assert meta == {
        "format": "pretrain-tokens",
        "version": 1,
        "dtype": dtype,
        "tokens": 1000,
        "vocabSize": vocab,
        "tokenizer": "byte",
        "eosId": 0,
    }
    assert (tmp_path / "s.bin").stat().st_size == 1000 * np.dtype(dtype).itemsize
    for path in (header, tmp_path / "s", tmp_path):  # header, prefix, directory
        source = open_source(path)
        assert len(source) == 1000
        assert source.vocab_size == vocab
        window = source.window(0, length=1000)
        assert window.dtype == np.int64
        assert np.array_equal(window, tokens)


def test_directory_source_reads_windows_across_shard_boundaries(tmp_path: Path) -> None:
    write_shard(tmp_path / "b", np.arange(10, 17), vocab_size=300, tokenizer="byte", eos_id=None)
    write_shard(tmp_path / "a", np.arange(10), vocab_size=256, tokenizer="byte", eos_id=None)
    write_shard(tmp_path / "c", np.arange(0), vocab_size=256, tokenizer="byte", eos_id=None)
    source = open_source(tmp_path)
    assert [p.name for p in source.files] == ["a.json", "b.json", "c.json"]  # sorted
    assert len(source) == 17
    assert source.vocab_size == 300
    assert source.window(8, length=5).tolist() == [8, 9, 10, 11, 12]
    assert source.window(0, length=17).tolist() == list(range(17))
    with pytest.raises(IndexError):
        source.window(10, length=8)


def test_a_shard_without_its_header_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "orphan.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match="holds no shards"):
        open_source(tmp_path)


def test_write_shard_rejects_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="token id 256 is outside"):
        write_shard(tmp_path / "s", np.array([1, 256]), vocab_size=256, tokenizer="b", eos_id=0)
    assert not (tmp_path / "s.json").exists()


def _good(tmp_path: Path) -> Path:
    return write_shard(tmp_path / "s", np.arange(8), vocab_size=256, tokenizer="byte", eos_id=0)


def _edit_header(**changes: object) -> Callable[[Path], Path]:
    def edit(tmp_path: Path) -> Path:
        header = _good(tmp_path)
        meta = json.loads(header.read_text())
        for key, value in changes.items():
            if value is None:
                del meta[key]
            else:
                meta[key] = value
        header.write_text(json.dumps(meta))
        return header

    return edit


def _bad_json(tmp_path: Path) -> Path:
    header = _good(tmp_path)
    header.write_text("{not json")
    return header


def _no_bin(tmp_path: Path) -> Path:
    header = _good(tmp_path)
    (tmp_path / "s.bin").unlink()
    return header


def _truncated(tmp_path: Path) -> Path:
    header = _good(tmp_path)
    (tmp_path / "s.bin").write_bytes(b"\0" * 10)
    return header


def _empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


@pytest.mark.parametrize(
    ("make", "file", "words"),
    [
        (lambda p: p / "nowhere", "nowhere", "no such shard"),
        (_empty_dir, "empty", "holds no shards"),
        (_bad_json, "s.json", "not valid JSON"),
        (_edit_header(format="npy"), "s.json", "not a shard header"),
        (_edit_header(version=2), "s.json", "unsupported shard version 2"),
        (_edit_header(dtype="int8"), "s.json", "unknown dtype 'int8'"),
        (_edit_header(tokens=None), "s.json", "missing field 'tokens'"),
        (_edit_header(vocabSize=70000), "s.json", "vocabSize 70000 does not fit dtype uint16"),
        (_no_bin, "s.bin", "token file missing"),
        (_truncated, "s.bin", "10 bytes, but the header says 8 tokens x 2 bytes = 16: truncated"),
    ],
    ids=[
        "missing-path",
        "empty-directory",
        "bad-json",
        "wrong-format",
        "unsupported-version",
        "unknown-dtype",
        "missing-field",
        "vocab-beyond-dtype",
        "bin-missing",
        "truncated-bin",
    ],
)
def test_every_data_problem_is_one_line_naming_the_file(
    tmp_path: Path, make: Callable[[Path], Path], file: str, words: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(DataError) as caught:
        open_source(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(str(tmp_path / file))
    assert words in message


def test_a_shard_vocabulary_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    write_shard(tmp_path / "big", np.arange(5), vocab_size=1000, tokenizer="t.json", eos_id=None)
    source = open_source(tmp_path)
    check_vocab(source, 1000)
    too_large = r"big\.json: vocabSize 1000 is larger than the model's vocabSize 512"
    with pytest.raises(DataError, match=too_large):
        check_vocab(source, 512)


# ---------------------------------------------------------------------------- prepare


def _texts(tmp_path: Path) -> Path:
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello")
    (root / "sub" / "b.txt").write_text("wörld")
    (root / "binary.dat").write_bytes(b"\xff\xfe\x00bad")
    return root


def test_prepare_bytes_separates_documents_with_nul(tmp_path: Path) -> None:
    done = prepare([_texts(tmp_path)], tmp_path / "out")
    assert done.header == tmp_path / "out" / "tokens.json"
    assert (done.files, done.skipped, done.vocab_size) == (2, 1, 256)
    expected = [*b"hello", 0, *"wörld".encode(), 0]  # sorted: a.txt, binary.dat, sub/b.txt
    assert done.tokens == len(expected) == 5 + 6 + 2
    assert open_source(done.header).window(0, length=done.tokens).tolist() == expected
    assert json.loads(done.header.read_text())["eosId"] == 0


def _word_tokenizer(tmp_path: Path, specials: list[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", *specials])
    tokenizer.train_from_iterator(["the cat sat", "the dog ran", "a cat ran"], trainer)
    path = tmp_path / "words.json"
    tokenizer.save(str(path))
    return path


def test_prepare_with_a_tokenizers_file_uses_its_vocabulary_and_eos(tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    path = _word_tokenizer(tmp_path, ["</s>"])
    words = Tokenizer.from_file(str(path))
    (tmp_path / "one.txt").write_text("the cat ran")
    (tmp_path / "two.txt").write_text("a dog sat")
    done = prepare(
        [tmp_path / "one.txt", tmp_path / "two.txt"],
        tmp_path / "out",
        tokenizer=str(path),
        name="words",
    )
    eos = words.token_to_id("</s>")
    assert done.vocab_size == words.get_vocab_size()
    ids = open_source(done.header).window(0, length=done.tokens).tolist()
    assert ids == [*words.encode("the cat ran").ids, eos, *words.encode("a dog sat").ids, eos]
    header = json.loads(done.header.read_text())
    assert (header["tokenizer"], header["eosId"]) == ("words.json", eos)


def test_prepare_without_an_eos_token_writes_no_separator(tmp_path: Path) -> None:
    path = _word_tokenizer(tmp_path, [])
    (tmp_path / "one.txt").write_text("the cat")
    done = prepare([tmp_path / "one.txt"], tmp_path / "out", tokenizer=str(path))
    assert done.tokens == 2
    assert json.loads(done.header.read_text())["eosId"] is None


def test_prepare_names_a_missing_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("x")
    with pytest.raises(DataError, match=r"nope\.json: no such tokenizer file"):
        prepare([tmp_path / "one.txt"], tmp_path / "out", tokenizer=str(tmp_path / "nope.json"))


def test_cli_data_prepare_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = _texts(tmp_path)
    out = tmp_path / "shards"
    assert main(["data", "prepare", str(texts), "--out", str(out), "--name", "web"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {out}/web.json: 13 tokens from 2 files (vocab 256)\n"
    assert captured.err == "warning: skipped 1 files that are not UTF-8 text\n"


def _documents(shard: Path) -> list[bytes]:
    """A byte shard's documents (NUL-separated)."""
    tokens = open_source(shard).window(0, length=len(open_source(shard)))
    return [d for d in bytes(tokens.astype("uint8")).split(b"\0") if d]


def test_split_eval_sets_whole_documents_aside_without_overlap(tmp_path: Path) -> None:
    texts = tmp_path / "texts"
    for i in range(200):
        (texts / f"d{i // 50}").mkdir(parents=True, exist_ok=True)
        (texts / f"d{i // 50}" / f"{i}.txt").write_text(f"document number {i}\n")
    done = prepare([texts], tmp_path / "out", split_eval=0.1)
    assert done.held_out is not None
    assert done.held_out.header == tmp_path / "out" / "eval" / "tokens.json"
    trained, held = _documents(tmp_path / "out"), _documents(tmp_path / "out" / "eval")
    assert not set(trained) & set(held)
    assert sorted(trained + held) == sorted(f"document number {i}\n".encode() for i in range(200))
    assert 5 <= len(held) <= 40  # about a tenth, by path hash
    assert (done.files, done.held_out.files) == (len(trained), len(held))
    # The same split on every run, and a document's side does not depend on the others.
    (texts / "more").mkdir()
    for i in range(200, 260):
        (texts / "more" / f"{i}.txt").write_text(f"document number {i}\n")
    prepare([texts], tmp_path / "again", split_eval=0.1)
    held_again = set(_documents(tmp_path / "again" / "eval"))
    assert held_again & set(trained + held) == set(held)


def test_held_out_takes_at_least_one_document_and_never_all() -> None:
    assert len(held_out(["a", "b"], fraction=1e-9)) == 1
    assert len(held_out(["a", "b", "c"], fraction=0.999999)) == 2
    assert held_out(["only"], fraction=0.5) == set()
    assert held_out(["a", "b"], fraction=0.0) == set()


def test_cli_split_eval_prints_both_shards_and_refuses_a_whole_fraction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(8):
        (texts / f"{i}.txt").write_text(f"text {i}")
    out = tmp_path / "out"
    assert main(["data", "prepare", str(texts), "--out", str(out), "--split-eval", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'tokens.json'}" in printed
    assert f"held out: wrote {out / 'eval' / 'tokens.json'}" in printed
    assert main(["data", "prepare", str(texts), "--out", str(out), "--split-eval", "1"]) == 2
    assert "--split-eval 1.0: the held-out fraction must be in [0, 1)" in capsys.readouterr().err


def test_cli_data_prepare_reports_a_missing_source_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    assert main(["data", "prepare", str(missing), "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {missing}: no such file or directory\n"
    assert captured.out == ""


def test_validate_does_not_import_the_data_layer() -> None:
    code = (
        "import sys; from pretrain_operator.cli import main; "
        f"main(['validate', '-q', {str(ROOT / 'examples' / 'tiny-cpu.yaml')!r}]); "
        "print(sorted(m for m in ('numpy', 'pretrain_trainer.data') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().endswith("[]")


def test_stdlib_corpus_has_two_nonempty_byte_sources(tmp_path: Path) -> None:
    dirs = build_stdlib_corpus(tmp_path, max_files=25)
    assert set(dirs) == {"code", "prose"}
    code, prose = open_source(dirs["code"]), open_source(dirs["prose"])
    assert len(code) > 10_000
    assert len(prose) > 1_000
    assert b"def " in bytes(code.window(0, length=len(code)).astype(np.uint8))
    assert code.vocab_size == prose.vocab_size == 256


# ---------------------------------------------------------------------------- sampler


def _sampler(**overrides: object) -> MixtureSampler:
    options: dict[str, object] = {
        "lengths": {"prose": 100_000, "code": 50_000, "math": 20_000},
        "mix": {"prose": 3, "code": 1, "math": 0},
        "seq_len": 16,
        "global_batch": 32,
        "seed": 7,
    }
    options.update(overrides)
    return MixtureSampler(**options)  # type: ignore[arg-type]


def test_global_stream_is_identical_for_any_world_size() -> None:
    reference = _sampler()
    expected = [reference.next_global_batch() for _ in range(20)]
    for world in (1, 2, 3, 4, 5, 7):  # 32 samples in micro-batches of 2: 16, uneven at 3, 5, 7
        split = BatchSplit(16, world)
        ranks = [_sampler() for _ in range(world)]  # every rank runs its own sampler
        for batch in expected:
            shares = [
                s.rank_slice(s.next_global_batch(), rank=rank, split=split)
                for rank, s in enumerate(ranks)
            ]
            sizes = [len(share) for share in shares]
            assert sizes == sorted(sizes, reverse=True)  # the longer shares come first
            assert max(sizes) - min(sizes) <= (0 if 16 % world == 0 else 2)
            assert [sample for share in shares for sample in share] == batch


def test_sampler_is_deterministic_and_seeded() -> None:
    first, second, other = _sampler(), _sampler(), _sampler(seed=8)
    a = [first.next_global_batch() for _ in range(5)]
    assert a == [second.next_global_batch() for _ in range(5)]
    assert a != [other.next_global_batch() for _ in range(5)]


def test_every_sample_is_a_full_window_of_its_source() -> None:
    sampler = _sampler()
    for _ in range(50):
        for name, offset in sampler.next_global_batch():
            assert offset % 16 == 0
            assert offset >= 0
            assert offset + 17 <= sampler.windows[name] * 16 + 1


@pytest.mark.parametrize("mix", [{"prose": 3, "code": 1}, {"prose": 1, "code": 4}])
def test_source_shares_follow_the_mix(mix: dict[str, float]) -> None:
    sampler = _sampler(mix=mix)
    for _ in range(200):
        sampler.next_global_batch()
    total = 200 * 32
    for name, weight in mix.items():
        p = weight / sum(mix.values())
        bound = 4 * (total * p * (1 - p)) ** 0.5
        assert abs(sampler.consumed[name] - total * p) < bound
    assert sampler.consumed["math"] == 0  # absent from the mix: weight 0


def test_zero_weight_sources_are_never_read() -> None:
    sampler = _sampler(mix={"prose": 1, "code": 0, "math": 1})
    seen = {name for _ in range(100) for name, _ in sampler.next_global_batch()}
    assert seen == {"prose", "math"}


def test_resuming_from_state_continues_the_same_stream() -> None:
    uninterrupted = _sampler()
    stream = [uninterrupted.next_global_batch() for _ in range(17)]
    first = _sampler()
    for _ in range(7):
        first.next_global_batch()
    state = json.loads(json.dumps(first.state_dict()))
    assert state["batches"] == 7
    assert sum(state["consumed"].values()) == 7 * 32
    resumed = _sampler()
    resumed.load_state_dict(state)
    assert [resumed.next_global_batch() for _ in range(10)] == stream[7:]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"seed": 8}, "seed"),
        ({"seq_len": 32}, "seqLen"),
        ({"mix": {"prose": 1, "code": 1}}, "data mix"),
    ],
)
def test_state_from_another_stream_is_refused(change: dict[str, object], words: str) -> None:
    state = _sampler().state_dict()
    with pytest.raises(DataError, match=words):
        _sampler(**change).load_state_dict(state)


def test_state_equal_mix_in_other_units_is_accepted() -> None:
    state = _sampler().state_dict()
    _sampler(mix={"prose": 0.75, "code": 0.25}).load_state_dict(state)


def test_each_epoch_reads_every_window_exactly_once() -> None:
    sampler = _sampler(lengths={"tiny": 10 * 16 + 1}, mix={"tiny": 1}, global_batch=6)
    assert sampler.windows == {"tiny": 10}
    offsets = [offset for _ in range(10) for _, offset in sampler.next_global_batch()]
    epochs = [[o // 16 for o in offsets[i : i + 10]] for i in range(0, 60, 10)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(10))
    assert len({tuple(epoch) for epoch in epochs}) > 1  # a new order per epoch


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 5000),
    seed=st.integers(0, 2**63 - 1),
    epoch=st.integers(0, 10**6),
    source=st.text(min_size=1, max_size=8),
)
def test_window_permutation_is_a_bijection(n: int, seed: int, epoch: int, source: str) -> None:
    order = permutation(n=n, seed=seed, source=source, epoch=epoch)(np.arange(n))
    assert np.array_equal(np.sort(order), np.arange(n))


def test_sources_of_a_billion_windows_need_no_index_arrays() -> None:
    sampler = _sampler(lengths={"web": 2**40, "code": 2**38}, mix={"web": 1, "code": 1})
    for _ in range(3):
        for name, offset in sampler.next_global_batch():
            assert offset + 17 <= {"web": 2**40, "code": 2**38}[name]


def test_a_source_without_a_full_sample_is_refused() -> None:
    with pytest.raises(DataError, match="'code' has 16 tokens, fewer than one sample"):
        _sampler(lengths={"prose": 1000, "code": 16})
    with pytest.raises(DataError, match="names source 'web', which has no tokens"):
        _sampler(mix={"prose": 1, "web": 1})


def test_rank_slices_split_unevenly_by_whole_micro_batches() -> None:
    batch = _sampler(global_batch=16).next_global_batch()
    split = BatchSplit(8, 3)  # micro-batches of 2: ranks run 3, 3 and 2
    shares = [MixtureSampler.rank_slice(batch, rank=r, split=split) for r in range(3)]
    assert shares == [batch[0:6], batch[6:12], batch[12:16]]
    wide = BatchSplit(8, 10)  # more ranks than micro-batches: the last two read nothing
    assert [len(MixtureSampler.rank_slice(batch, rank=r, split=wide)) for r in range(10)] == [
        2
    ] * 8 + [0, 0]
    with pytest.raises(ValueError, match="16 samples is not 5 equal micro-batches"):
        MixtureSampler.rank_slice(batch, rank=0, split=BatchSplit(5, 2))
    with pytest.raises(ValueError, match="rank 3 is not in a world of size 3"):
        MixtureSampler.rank_slice(batch, rank=3, split=split)


def test_read_samples_gives_inputs_and_shifted_targets(tmp_path: Path) -> None:
    write_shard(tmp_path / "s", np.arange(50), vocab_size=256, tokenizer="byte", eos_id=0)
    sources = {"s": open_source(tmp_path)}
    sampler = MixtureSampler(lengths={"s": 50}, mix={"s": 1}, seq_len=8, global_batch=4, seed=0)
    batch = sampler.next_global_batch()
    tokens = read_samples(sources, batch, seq_len=8)
    assert tokens.shape == (4, 9)
    for row, (_, offset) in zip(tokens, batch, strict=True):
        assert row.tolist() == list(range(offset, offset + 9))
