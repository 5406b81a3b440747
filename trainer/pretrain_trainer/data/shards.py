"""Token shards on disk: the format, a writer, and memory-mapped reading.

A shard is two files side by side:

``<name>.bin``
    The token ids, flat, little-endian ``uint16`` (vocabularies up to 65,536) or ``uint32``.
``<name>.json``
    The header, written last::

        {"format": "pretrain-tokens", "version": 1, "dtype": "uint16" | "uint32",
         "tokens": N, "vocabSize": V, "tokenizer": "byte" | "<tokenizer file name>",
         "eosId": int | null}

A shard prepared with a tokenizers JSON file keeps a copy of it beside, as
``tokenizer/<file name>`` (a subfolder: a source reads every ``*.json`` directly in its
directory as a header), so a checkpoint can carry the tokenizer its data was made with.

The header is written last, through a temporary file and ``os.replace``, so a shard whose
header exists is complete: a writer that dies midway leaves a ``.bin`` without a header, which
readers ignore. A *source* (``DataConfig.sources[].path``) is one shard or a directory of shards
read in the sorted order of their headers; its tokens are the concatenation of its shards.

Reading memory-maps every ``.bin``: opening a source costs a few syscalls whatever its size,
pages are shared between the processes of a node, and a sample copies only its own window.
Every problem raises :class:`DataError` with one line naming the file and what is wrong, since
a bad data path is a permanent failure that a person has to fix.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from ..errors import PermanentError

FORMAT = "pretrain-tokens"
VERSION = 1
DTYPES: dict[str, type[np.unsignedinteger[Any]]] = {"uint16": np.uint16, "uint32": np.uint32}
_FIELDS = ("dtype", "tokens", "vocabSize", "tokenizer", "eosId")
TOKENIZER_DIR = "tokenizer"


class DataError(PermanentError):
    """Token data is missing or malformed; the message is one line naming the file. Permanent:
    a person has to fix the data or the path before a retry can do better."""


def dtype_for(vocab_size: int) -> str:
    """The narrowest shard dtype that holds every id of a ``vocab_size`` vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class ShardWriter:
    """Streams tokens into ``<prefix>.bin``; :meth:`close` publishes the header.

    Use as a context manager: on an exception nothing is published and the partial ``.bin``
    is removed. Any older header at the same prefix is removed before the first byte is
    written, so a reader never pairs an old header with new tokens.
    """

    def __init__(self, prefix: Path, *, vocab_size: int, tokenizer: str, eos_id: int | None):
        if vocab_size < 1 or vocab_size > 1 << 32:
            raise DataError(f"{prefix}: vocabSize {vocab_size} must be in 1..{1 << 32}")
        if eos_id is not None and not 0 <= eos_id < vocab_size:
            raise DataError(f"{prefix}: eosId {eos_id} is outside the vocabulary ({vocab_size})")
        self.header_path = Path(f"{prefix}.json")
        self.bin_path = Path(f"{prefix}.bin")
        self._partial = Path(f"{prefix}.bin.partial")
        self._dtype = dtype_for(vocab_size)
        self._header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self._dtype,
            "tokens": 0,
            "vocabSize": vocab_size,
            "tokenizer": tokenizer,
            "eosId": eos_id,
        }
        self.header_path.parent.mkdir(parents=True, exist_ok=True)
        self.header_path.unlink(missing_ok=True)
        self._file = self._partial.open("wb")

    @property
    def tokens(self) -> int:
        return int(self._header["tokens"])

    def append(self, tokens: npt.ArrayLike) -> None:
        ids = np.asarray(tokens)
        if ids.size == 0:
            return
        if ids.dtype.kind not in "iu":
            raise DataError(f"{self.bin_path}: token ids must be integers, not {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self._header["vocabSize"]:
            raise DataError(
                f"{self.bin_path}: token id {low if low < 0 else high} is outside the "
                f"vocabulary (vocabSize {self._header['vocabSize']})"
            )
        self._file.write(ids.astype(np.dtype(self._dtype).newbyteorder("<"), copy=False).tobytes())
        self._header["tokens"] += int(ids.size)

    def close(self) -> Path:
        """Make the tokens durable, then publish the header; returns the header path."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.bin_path)
        temporary = self.header_path.with_suffix(".json.partial")
        temporary.write_text(json.dumps(self._header, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, self.header_path)
        return self.header_path

    def abort(self) -> None:
        self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_shard(
    prefix: Path, tokens: npt.ArrayLike, *, vocab_size: int, tokenizer: str, eos_id: int | None
) -> Path:
    """Write ``tokens`` as the shard ``<prefix>.bin`` + ``<prefix>.json``; returns the header."""
    with ShardWriter(prefix, vocab_size=vocab_size, tokenizer=tokenizer, eos_id=eos_id) as out:
        out.append(tokens)
    return out.header_path


@dataclass(frozen=True)
class Shard:
    """One shard as read from its header, with its tokens memory-mapped."""

    header_path: Path
    bin_path: Path
    vocab_size: int
    tokenizer: str
    eos_id: int | None
    tokens: npt.NDArray[np.unsignedinteger[Any]]


def keep_tokenizer(file: Path, directory: Path) -> Path:
    """Copy the tokenizers JSON ``file`` to ``directory/tokenizer/<its name>``, whole or not
    at all; returns the copy."""
    target = directory / TOKENIZER_DIR / file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(file, partial)
    os.replace(partial, target)
    return target


def tokenizer_file(shard: Shard) -> Path | None:
    """The copy of ``shard``'s tokenizer kept beside it (:func:`keep_tokenizer`), or None:
    the ``byte`` tokenizer needs no file, and shards prepared before copies were kept lack
    one."""
    if Path(shard.tokenizer).name != shard.tokenizer:  # not a file name: no copy kept
        return None
    path = shard.header_path.parent / TOKENIZER_DIR / shard.tokenizer
    return path if path.is_file() else None


def _field(header: Mapping[str, Any], name: str, path: Path) -> Any:
    if name not in header:
        raise DataError(f"{path}: shard header is missing field {name!r}")
    return header[name]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_shard(header_path: Path) -> Shard:
    """Parse and check one header, and memory-map its ``.bin``."""
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{header_path}: shard header is not valid JSON ({error})") from None
    except OSError as error:
        raise DataError(f"{header_path}: cannot read shard header ({error.strerror})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise DataError(f"{header_path}: not a shard header (format {found!r}, want {FORMAT!r})")
    if header.get("version") != VERSION:
        raise DataError(
            f"{header_path}: unsupported shard version {header.get('version')!r} (want {VERSION})"
        )
    dtype, tokens, vocab, tokenizer, eos = (_field(header, f, header_path) for f in _FIELDS)
    if dtype not in DTYPES:
        raise DataError(f"{header_path}: unknown dtype {dtype!r} (want uint16 or uint32)")
    if not _is_int(tokens) or tokens < 0:
        raise DataError(f"{header_path}: tokens must be a non-negative integer, not {tokens!r}")
    if not _is_int(vocab) or vocab < 1 or vocab > np.iinfo(DTYPES[dtype]).max + 1:
        raise DataError(f"{header_path}: vocabSize {vocab!r} does not fit dtype {dtype}")
    if not isinstance(tokenizer, str):
        raise DataError(f"{header_path}: tokenizer must be a string, not {tokenizer!r}")
    if eos is not None and (not _is_int(eos) or not 0 <= eos < vocab):
        raise DataError(f"{header_path}: eosId {eos!r} is not an id below vocabSize {vocab}")
    bin_path = header_path.with_suffix(".bin")
    try:
        size = bin_path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{bin_path}: token file missing (named by {header_path.name})") from None
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    if size != tokens * itemsize:
        raise DataError(
            f"{bin_path}: {size} bytes, but the header says {tokens} tokens x {itemsize} bytes "
            f"= {tokens * itemsize}: truncated or wrong header"
        )
    little = np.dtype(DTYPES[dtype]).newbyteorder("<")
    ids = np.memmap(bin_path, dtype=little, mode="r") if tokens else np.empty(0, little)
    return Shard(header_path, bin_path, vocab, tokenizer, eos, ids)


class TokenSource:
    """The concatenated tokens of one or more shards, read by window."""

    def __init__(self, shards: Sequence[Shard]):
        if not shards:
            raise DataError("a token source needs at least one shard")
        tokenizers = {s.tokenizer for s in shards}
        if len(tokenizers) > 1:
            raise DataError(
                f"{shards[0].header_path.parent}: shards from different tokenizers "
                f"({', '.join(sorted(tokenizers))}) in one source"
            )
        self.shards = tuple(shards)
        sizes = np.array([len(s.tokens) for s in shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def vocab_size(self) -> int:
        return max(s.vocab_size for s in self.shards)

    @property
    def files(self) -> list[Path]:
        """The shards' header paths, in reading order."""
        return [s.header_path for s in self.shards]

    def window(self, start: int, *, length: int) -> npt.NDArray[np.int64]:
        """Tokens ``[start, start + length)`` as a new int64 array, across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) is outside [0, {len(self)})")
        out = np.empty(length, dtype=np.int64)
        index = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            shard = self.shards[index].tokens
            begin = start + done - int(self._starts[index])
            take = min(length - done, len(shard) - begin)
            out[done : done + take] = shard[begin : begin + take]
            done += take
            index += 1
        return out


def open_source(path: str | Path) -> TokenSource:
    """Open a shard header, a shard prefix (``dir/name``), or a directory of shards."""
    path = Path(path)
    if path.is_dir():
        headers = sorted(path.glob("*.json"))
        if not headers:
            raise DataError(f"{path}: directory holds no shards (no *.json headers)")
    elif path.suffix in (".json", ".bin") and path.exists():
        headers = [path.with_suffix(".json")]
    elif Path(f"{path}.json").is_file():
        headers = [Path(f"{path}.json")]
    else:
        raise DataError(f"{path}: no such shard, prefix or directory")
    return TokenSource([read_shard(h) for h in headers])


def check_vocab(source: TokenSource, model_vocab: int) -> None:
    """Raise :class:`DataError` if a shard holds ids the model cannot embed."""
    for shard in source.shards:
        if shard.vocab_size > model_vocab:
            raise DataError(
                f"{shard.header_path}: vocabSize {shard.vocab_size} is larger than the "
                f"model's vocabSize {model_vocab}"
            )


def read_samples(
    sources: Mapping[str, TokenSource], samples: Sequence[tuple[str, int]], *, seq_len: int
) -> npt.NDArray[np.int64]:
    """The tokens of ``(source, offset)`` samples as a ``(len(samples), seq_len + 1)`` array.

    Inputs are ``[:, :-1]`` and next-token targets ``[:, 1:]``.
    """
    out = np.empty((len(samples), seq_len + 1), dtype=np.int64)
    for row, (name, offset) in enumerate(samples):
        out[row] = sources[name].window(offset, length=seq_len + 1)
    return out
