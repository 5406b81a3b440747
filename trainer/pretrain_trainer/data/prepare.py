"""Turn text files into one token shard (``pretrainctl data prepare``).

Every input file is one document. Documents are written in sorted path order, each followed
by the end-of-sequence id, so a shard's documents stay separated when shards are concatenated
into a source and the model learns where a document ends.

Two tokenizers:

``byte``
    The UTF-8 bytes themselves, vocabulary 256, with NUL (id 0) as end of sequence: a text
    file never holds NUL, so the separator cannot be confused with content. Needs no file.
any other value
    The path of a Hugging Face ``tokenizers`` JSON file. Its vocabulary size includes added
    tokens; the separator is the first of :data:`EOS_TOKENS` it knows, or none. Special tokens
    of its post-processor (``[CLS]`` and the like) are not added: pretraining wants raw text.
    A copy of the file is kept beside the shard (``out/tokenizer/<file name>``), so the
    job's checkpoints can carry it and an export needs nothing else.

Files that are not UTF-8 text (or hold NUL) are skipped and counted, not fatal: a corpus
directory routinely holds a stray binary, and the caller reports the count.

A held-out split (``split_eval``) sets whole documents aside into ``out/eval/<name>``, a
source for ``data.evalSources``: documents never overlap between the two shards. Which ones
is decided by a hash of each file's path relative to its input, so the split is the same on
every run and does not move when documents are added elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .shards import DataError, ShardWriter, keep_tokenizer

BYTE = "byte"
EVAL_DIR = "eval"
"""Where a held-out split goes, under the shard's directory (not a shard directory itself:
a source reads only the headers directly in its directory)."""
EOS_TOKENS = ("</s>", "<|endoftext|>", "<eos>", "[SEP]")

Encoder = Callable[[str], npt.NDArray[np.int64]]


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` wrote."""

    header: Path
    files: int
    """Documents written."""
    tokens: int
    vocab_size: int
    skipped: int
    """Files skipped because they are not UTF-8 text."""
    held_out: Prepared | None = None
    """The held-out shard, when one was split off."""


def held_out(documents: Sequence[str], *, fraction: float) -> set[str]:
    """The documents (relative paths) a ``fraction`` split sets aside: those whose path hash
    falls below it, at least one when there are two or more, never all of them."""
    if fraction <= 0 or len(documents) < 2:
        return set()
    rank = sorted(documents, key=lambda d: (zlib.crc32(d.encode()), d))
    chosen = {d for d in rank if zlib.crc32(d.encode()) < fraction * 2**32}
    if not chosen:
        chosen = {rank[0]}
    if len(chosen) == len(documents):
        chosen.discard(rank[-1])
    return chosen


def _text_files(sources: Sequence[Path]) -> Iterator[tuple[Path, str]]:
    """Every file of ``sources`` and its path relative to the input that named it."""
    for source in sources:
        if source.is_dir():
            for path in sorted(p for p in source.rglob("*") if p.is_file()):
                yield path, path.relative_to(source).as_posix()
        elif source.is_file():
            yield source, source.name
        else:
            raise DataError(f"{source}: no such file or directory")


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror})") from None
    return None if "\0" in text else text


def _byte_encoder(text: str) -> npt.NDArray[np.int64]:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


def load_tokenizer(path: str) -> tuple[Encoder, int, int | None, str]:
    """(encode, vocab size, eos id, header name) for ``byte`` or a tokenizers JSON file."""
    if path == BYTE:
        return _byte_encoder, 256, 0, BYTE
    from tokenizers import Tokenizer

    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such tokenizer file (or use --tokenizer byte)")
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception on a malformed file
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"{file}: not a tokenizers JSON file ({first})") from None
    eos = next(
        (i for i in map(tokenizer.token_to_id, EOS_TOKENS) if i is not None),
        None,
    )

    def encode(text: str) -> npt.NDArray[np.int64]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    return encode, tokenizer.get_vocab_size(), eos, file.name


def prepare(
    sources: list[Path],
    out: Path,
    *,
    tokenizer: str = BYTE,
    name: str | None = None,
    split_eval: float = 0.0,
) -> Prepared:
    """Tokenize every text file of ``sources`` into the shard ``out/<name or 'tokens'>``, and
    a ``split_eval`` fraction of the documents into ``out/eval/<name>`` instead."""
    name = name or "tokens"
    if Path(name).name != name or name in (".", ".."):
        raise DataError(f"{name}: a shard name is a file name, without directories")
    if not 0 <= split_eval < 1:
        raise DataError(f"--split-eval {split_eval}: the held-out fraction must be in [0, 1)")
    encode, vocab, eos, tokenizer_name = load_tokenizer(tokenizer)
    if tokenizer != BYTE:
        keep_tokenizer(Path(tokenizer), out)
    files = list(_text_files([Path(s) for s in sources]))
    aside = held_out([key for _, key in files], fraction=split_eval)
    counts = {False: [0, 0], True: [0, 0]}  # held out -> [written, skipped]
    with contextlib.ExitStack() as stack:
        shards = {
            held: stack.enter_context(
                ShardWriter(prefix, vocab_size=vocab, tokenizer=tokenizer_name, eos_id=eos)
            )
            for held, prefix in ((False, out / name), (True, out / EVAL_DIR / name))
            if not held or aside
        }
        for path, key in files:
            held = key in aside
            text = _read_text(path)
            if text is None:
                counts[held][1] += 1
                continue
            shards[held].append(encode(text))
            if eos is not None:
                shards[held].append(np.array([eos], dtype=np.int64))
            counts[held][0] += 1
        for held, (written, skipped) in counts.items():
            if held in shards and not written:
                what = "held-out documents" if held else "UTF-8 text files"
                raise DataError(
                    f"{', '.join(map(str, sources))}: no {what} to tokenize"
                    + (f" ({skipped} skipped)" if skipped else "")
                )
    results = {
        held: Prepared(
            header=shard.header_path,
            files=counts[held][0],
            tokens=shard.tokens,
            vocab_size=vocab,
            skipped=counts[held][1],
        )
        for held, shard in shards.items()
    }
    if True in results:
        return dataclasses.replace(results[False], held_out=results[True])
    return results[False]
