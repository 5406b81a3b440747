"""The trainer's data layer: token shards, text preparation and the mixture sampler.

NumPy only (no torch), so shards can be prepared and inspected on any machine, and the
sampler's arithmetic is tested without a model. The trainer reads a global batch as
``read_samples(sources, sampler.rank_slice(sampler.next_global_batch(), rank, world), ...)``.
"""

from .corpus import build_stdlib_corpus
from .prepare import EOS_TOKENS, Prepared, prepare
from .sampler import MixtureSampler, WindowPermutation, permutation
from .shards import (
    DataError,
    Shard,
    ShardWriter,
    TokenSource,
    check_vocab,
    open_source,
    read_samples,
    read_shard,
    write_shard,
)

__all__ = [
    "EOS_TOKENS",
    "DataError",
    "MixtureSampler",
    "Prepared",
    "Shard",
    "ShardWriter",
    "TokenSource",
    "WindowPermutation",
    "build_stdlib_corpus",
    "check_vocab",
    "open_source",
    "permutation",
    "prepare",
    "read_samples",
    "read_shard",
    "write_shard",
]
