"""The trainer's data layer: token shards, text preparation and the mixture sampler.

NumPy only (no torch), so shards can be prepared and inspected on any machine, and the
sampler's arithmetic is tested without a model. The trainer reads through
:class:`~pretrain_trainer.data.loader.DataLoader`, which yields torch tensors and is therefore
imported explicitly, never from here: each step it takes the sampler's next global batch, this
rank's ``rank_slice`` of it, and ``read_samples`` of that.
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
