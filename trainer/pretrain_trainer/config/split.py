"""How one global batch splits into micro-batches over the processes of a world.

A stage's global batch is ``M = globalBatchSize / microBatchSize`` micro-batches. At a world
of ``P`` processes, rank ``r`` runs ``M // P`` of them, plus one for each of the first
``M % P`` ranks, and reads the contiguous run of samples that starts after the ranks before
it: the global batch (and so the stream of samples) is the same at every world size, and only
where it is cut moves. An optimizer step costs the longest rank's count, so a world's
*efficiency* is the mean count over the longest, and its *useful size* (what it trains as
fast as) is ``workers x efficiency``. Pure arithmetic: no torch, shared by the planner (which
world size to run) and the trainer (which samples each rank reads).
"""

from __future__ import annotations

from dataclasses import dataclass


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BatchSplit:
    """``micro_batches`` micro-batches of one optimizer step over ``ranks`` processes."""

    micro_batches: int
    ranks: int

    def __post_init__(self) -> None:
        if self.micro_batches < 1 or self.ranks < 1:
            raise ValueError(
                f"a split needs >= 1 micro-batch and >= 1 rank, not "
                f"{self.micro_batches} over {self.ranks}"
            )

    @property
    def most(self) -> int:
        """Micro-batches of the longest rank: what one optimizer step costs."""
        return _ceil_div(self.micro_batches, self.ranks)

    @property
    def fewest(self) -> int:
        """Micro-batches of the shortest rank (0 when there are more ranks than micro-batches)."""
        return self.micro_batches // self.ranks

    @property
    def even(self) -> bool:
        return self.micro_batches % self.ranks == 0

    @property
    def efficiency(self) -> float:
        """Mean micro-batches per rank over the longest rank's: 1.0 when the split is even."""
        return self.micro_batches / (self.ranks * self.most)

    def count(self, rank: int) -> int:
        """Micro-batches rank ``rank`` runs."""
        self._check(rank)
        return self.fewest + (rank < self.micro_batches % self.ranks)

    def first(self, rank: int) -> int:
        """Index, in the global batch, of rank ``rank``'s first micro-batch."""
        self._check(rank)
        return rank * self.fewest + min(rank, self.micro_batches % self.ranks)

    def weight(self) -> float:
        """What each micro-batch's mean loss is multiplied by before its backward, so that
        gradients averaged over the ranks are the mean over the whole global batch."""
        return self.ranks / self.micro_batches

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.ranks:
            raise ValueError(f"rank {rank} is not in a world of size {self.ranks}")


def fewest_ranks_as_fast(micro_batches: int, ranks: int) -> int:
    """The fewest ranks whose longest count is the same as at ``ranks``: as fast, on fewer
    processes (a split that divides is always the fewest of its speed)."""
    return _ceil_div(micro_batches, BatchSplit(micro_batches, ranks).most)
