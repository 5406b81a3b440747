"""Which tokens every sample of a stage reads: a mixture sampler that ignores world size.

Why global: an elastic job restarts at whatever world size the cluster allows, and the data
it has seen must not depend on that. So the sampler decides the *global* batch, the same for
1 or 64 ranks, and each rank reads its contiguous share (:meth:`MixtureSampler.rank_slice`),
which differs between ranks by at most one micro-batch where the world does not divide it.
Its whole position is two counters, batches drawn and samples drawn per source, which fit in
a checkpoint manifest; a restart at another world size restores them and continues exactly
where the last run stopped: nothing is repeated and nothing skipped.

How a global batch ``b`` is drawn:

1. Sources: ``default_rng([seed, b])`` draws one uniform number per sample, mapped through the
   cumulative normalised weights (sources in name order; a zero weight is never drawn). The
   draw depends on ``b`` alone, so batch ``b`` can be recomputed without replaying the others.
2. Windows: a source of ``n`` windows (``seq_len + 1`` tokens starting at multiples of
   ``seq_len``, so targets never reach past the data) hands out its ``k``-th sample of the
   stage from window ``perm(k // n)[k % n]``. ``perm`` is a keyed pseudo-random permutation
   of ``[0, n)``, a new one per epoch and per source: every window is read exactly once per
   epoch and the order differs between epochs.

The permutation is a Feistel network on the smallest even number of bits covering ``n``,
with cycle walking (re-encrypt until the value falls below ``n``), which is a bijection of
``[0, n)`` computed per index in O(1) memory: a source of 10^9 windows needs no index array.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from ..config.split import BatchSplit
from .shards import DataError

T = TypeVar("T")

STATE_VERSION = 1
ROUNDS = 6
_PERMUTATION_SALT = 0x7065726D  # b"perm": keeps window keys apart from the mixture stream
_CACHED_PERMUTATIONS = 64


def _source_key(name: str) -> int:
    """A stable 64-bit key per source name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """SplitMix64's finaliser: a fast, well-spread 64-bit hash (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowPermutation:
    """A keyed bijection of ``[0, n)``, evaluated on arrays of indices."""

    def __init__(self, *, n: int, keys: Sequence[int]):
        if n < 1:
            raise ValueError(f"a permutation needs n >= 1, not {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._half = np.uint64((bits + 1) // 2)
        self._mask = np.uint64((1 << int(self._half)) - 1)
        self._keys = [np.uint64(k) for k in keys]

    def _encrypt(self, x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & self._mask)
        return (left << self._half) | right

    def __call__(self, index: npt.ArrayLike) -> npt.NDArray[np.int64]:
        flat = np.asarray(index, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.n):
            raise IndexError(f"permutation index outside [0, {self.n})")
        x = self._encrypt(flat.astype(np.uint64))
        walking = np.flatnonzero(x >= self.n)
        while walking.size:  # cycle walking: ends because index's own cycle holds a value < n
            x[walking] = self._encrypt(x[walking])
            walking = walking[x[walking] >= self.n]
        return x.astype(np.int64).reshape(np.shape(index))


def permutation(*, n: int, seed: int, source: str, epoch: int) -> WindowPermutation:
    """The window order of ``source`` in ``epoch``: distinct per seed, source and epoch."""
    entropy = [seed, _PERMUTATION_SALT, _source_key(source), epoch]
    keys = np.random.SeedSequence(entropy).generate_state(ROUNDS, dtype=np.uint64)
    return WindowPermutation(n=n, keys=[int(k) for k in keys])


def _normalised(mix: Mapping[str, float]) -> dict[str, float]:
    total = math.fsum(mix.values())
    if not math.isfinite(total) or total <= 0:
        raise DataError(f"data mix weights must sum to a positive finite number, not {total}")
    return {name: weight / total for name, weight in sorted(mix.items())}


class MixtureSampler:
    """The stream of global batches of one stage, as (source, token offset) pairs.

    A sample reads tokens ``[offset, offset + seq_len + 1)`` of its source: the first
    ``seq_len`` are the input, the last ``seq_len`` the next-token targets.
    """

    def __init__(
        self,
        *,
        lengths: Mapping[str, int],
        mix: Mapping[str, float],
        seq_len: int,
        global_batch: int,
        seed: int,
    ):
        if seq_len < 1 or global_batch < 1:
            raise ValueError(f"seq_len ({seq_len}) and global_batch ({global_batch}) must be >= 1")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, not {seed}")
        for name, weight in mix.items():
            if not weight >= 0:
                raise DataError(f"data mix weight of {name!r} must be >= 0, not {weight}")
            if weight and name not in lengths:  # a zero weight may name a source not opened
                raise DataError(f"data mix names source {name!r}, which has no tokens loaded")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.mix = _normalised({name: mix.get(name, 0.0) for name in lengths})
        self.sources = list(self.mix)
        self.windows = {name: max(0, (lengths[name] - 1) // seq_len) for name in self.sources}
        for name, weight in self.mix.items():
            if weight > 0 and self.windows[name] == 0:
                raise DataError(
                    f"source {name!r} has {lengths[name]} tokens, fewer than one sample of "
                    f"seq_len + 1 = {seq_len + 1}"
                )
        weights = np.array([self.mix[name] for name in self.sources])
        self._bounds = np.cumsum(weights)
        self._last = int(np.flatnonzero(weights > 0)[-1])  # absorbs rounding at the top end
        self._permutations: dict[tuple[str, int], WindowPermutation] = {}
        self.batches = 0
        self.consumed = dict.fromkeys(self.sources, 0)

    def _choices(self, batch: int) -> npt.NDArray[np.int64]:
        uniform = np.random.default_rng([self.seed, batch]).random(self.global_batch)
        picks: npt.NDArray[np.int64] = np.searchsorted(
            self._bounds, uniform * self._bounds[-1], side="right"
        ).astype(np.int64)
        return np.minimum(picks, self._last)

    def _permutation(self, name: str, epoch: int) -> WindowPermutation:
        key = (name, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= _CACHED_PERMUTATIONS:
                self._permutations.clear()
            self._permutations[key] = permutation(
                n=self.windows[name], seed=self.seed, source=name, epoch=epoch
            )
        return self._permutations[key]

    def _windows(self, name: str, draws: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Window indices of the ``draws``-th samples (counted over the stage) of a source."""
        n = self.windows[name]
        epochs, positions = np.divmod(draws, n)
        out = np.empty_like(draws)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self._permutation(name, int(epoch))(positions[chosen])
        return out

    def next_global_batch(self) -> list[tuple[str, int]]:
        """The next global batch as ``global_batch`` (source, token offset) pairs."""
        choices = self._choices(self.batches)
        offsets = np.empty(self.global_batch, dtype=np.int64)
        for index, name in enumerate(self.sources):
            rows = np.flatnonzero(choices == index)
            if rows.size:
                draws = self.consumed[name] + np.arange(rows.size, dtype=np.int64)
                offsets[rows] = self._windows(name, draws) * self.seq_len
                self.consumed[name] += int(rows.size)
        self.batches += 1
        return [(self.sources[c], int(o)) for c, o in zip(choices, offsets, strict=True)]

    @staticmethod
    def rank_slice(batch: Sequence[T], *, rank: int, split: BatchSplit) -> list[T]:
        """Rank ``rank``'s contiguous share of a global batch: its ``split.count(rank)``
        micro-batches, from its ``split.first(rank)``-th on (shares differ by at most one
        micro-batch where the world does not divide the batch)."""
        if not batch or len(batch) % split.micro_batches:
            raise ValueError(
                f"global batch of {len(batch)} samples is not {split.micro_batches} "
                "equal micro-batches"
            )
        micro = len(batch) // split.micro_batches
        start = split.first(rank) * micro
        return list(batch[start : start + split.count(rank) * micro])

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position (JSON-serialisable), with what it is only valid for."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "seqLen": self.seq_len,
            "mix": {name: weight for name, weight in self.mix.items() if weight > 0},
            "batches": self.batches,
            "consumed": dict(self.consumed),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; DataError if it belongs to another stream."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r} is not supported")
        for key, mine in (("seed", self.seed), ("seqLen", self.seq_len)):
            if state.get(key) != mine:
                raise DataError(f"sampler state is for {key} {state.get(key)!r}, not {mine}")
        saved = state.get("mix")
        active = {name: weight for name, weight in self.mix.items() if weight > 0}
        if (
            not isinstance(saved, dict)
            or saved.keys() != active.keys()
            or not all(math.isclose(saved[k], active[k], rel_tol=1e-9) for k in active)
        ):
            raise DataError(f"sampler state is for data mix {saved!r}, not {active!r}")
        batches, consumed = state.get("batches"), state.get("consumed")
        if not isinstance(batches, int) or batches < 0 or not isinstance(consumed, dict):
            raise DataError("sampler state has no valid 'batches' and 'consumed' counters")
        for name, count in consumed.items():
            if not isinstance(count, int) or count < 0:
                raise DataError(f"sampler state: consumed[{name!r}] = {count!r} is not a count")
            if count and name not in self.consumed:
                raise DataError(f"sampler state has samples of unknown source {name!r}")
        self.batches = batches
        self.consumed = {name: int(consumed.get(name, 0)) for name in self.sources}
