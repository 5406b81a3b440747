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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .shards import DataError, ShardWriter, keep_tokenizer

BYTE = "byte"
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


def _text_files(sources: Sequence[Path]) -> Iterator[Path]:
    for source in sources:
        if source.is_dir():
            yield from sorted(p for p in source.rglob("*") if p.is_file())
        elif source.is_file():
            yield source
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
    sources: list[Path], out: Path, *, tokenizer: str = BYTE, name: str | None = None
) -> Prepared:
    """Tokenize every text file of ``sources`` into the shard ``out/<name or 'tokens'>``."""
    name = name or "tokens"
    if Path(name).name != name or name in (".", ".."):
        raise DataError(f"{name}: a shard name is a file name, without directories")
    encode, vocab, eos, tokenizer_name = load_tokenizer(tokenizer)
    if tokenizer != BYTE:
        keep_tokenizer(Path(tokenizer), out)
    files = list(_text_files([Path(s) for s in sources]))
    written = skipped = 0
    with ShardWriter(out / name, vocab_size=vocab, tokenizer=tokenizer_name, eos_id=eos) as shard:
        for path in files:
            text = _read_text(path)
            if text is None:
                skipped += 1
                continue
            shard.append(encode(text))
            if eos is not None:
                shard.append(np.array([eos], dtype=np.int64))
            written += 1
        if not written:
            raise DataError(
                f"{', '.join(map(str, sources))}: no UTF-8 text files to tokenize"
                + (f" ({skipped} skipped)" if skipped else "")
            )
    return Prepared(
        header=shard.header_path,
        files=written,
        tokens=shard.tokens,
        vocab_size=vocab,
        skipped=skipped,
    )
