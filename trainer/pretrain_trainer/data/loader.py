"""One stage's data loader: the sources of its data mix, its sampler, and each rank's batches.

The loader is the only stateful part of the data layer, and its state is the sampler's
(:meth:`DataLoader.state_dict`), which a checkpoint's manifest carries. It holds no rank: the
sampler draws the *global* batch whatever the world size, and :meth:`DataLoader.next_batch`
cuts this rank's share at each call, so a restart at another world size continues the same
stream (``sampler`` explains why).

This module yields torch tensors, so, like ``ckpt.engine``, it is imported explicitly: the
rest of the data package stays NumPy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..config import BatchSplit, RunConfig
from .sampler import MixtureSampler
from .shards import DataError, TokenSource, check_vocab, open_source, read_samples

MicroBatch = tuple[torch.Tensor, torch.Tensor]
"""(inputs, next-token targets), each ``(micro_batch_size, seq_len)``."""


def open_sources(config: RunConfig, *, stage_index: int) -> dict[str, TokenSource]:
    """The sources a stage's data mix names, each checked against the model's vocabulary;
    a :class:`DataError` names the source it is about."""
    paths = {s.name: s.path for s in config.data.sources}
    sources = {}
    for name in config.stages[stage_index].data_mix:
        try:
            sources[name] = open_source(paths[name])
            check_vocab(sources[name], config.model.vocab_size)
        except DataError as error:
            raise DataError(f"data source {name!r}: {error}") from None
    return sources


class DataLoader:
    """This stage's stream of global batches, read as one rank's micro-batches."""

    def __init__(
        self,
        *,
        sources: Mapping[str, TokenSource],
        sampler: MixtureSampler,
        micro_batch_size: int,
    ) -> None:
        self.sources, self.sampler = dict(sources), sampler
        self.micro_batch_size = micro_batch_size

    @classmethod
    def build(cls, config: RunConfig, *, stage_index: int) -> DataLoader:
        """Open the stage's sources and its sampler. Every problem with the data raises
        :class:`DataError` here, before the first step (and before the process group)."""
        stage = config.stages[stage_index]
        sources = open_sources(config, stage_index=stage_index)
        sampler = MixtureSampler(
            lengths={name: len(source) for name, source in sources.items()},
            mix=dict(stage.data_mix),
            seq_len=stage.seq_len_for(config.model),
            global_batch=stage.global_batch_size,
            seed=config.data.seed_for(stage_index),
        )
        return cls(sources=sources, sampler=sampler, micro_batch_size=stage.micro_batch_size)

    def next_batch(self, *, rank: int, split: BatchSplit, device: torch.device) -> list[MicroBatch]:
        """This rank's share of the next global batch under ``split``, as micro-batches on
        ``device`` (none for a rank of a world larger than the batch). Every rank must call it
        once per step: each call advances the stream by one global batch."""
        batch = self.sampler.next_global_batch()
        mine = self.sampler.rank_slice(batch, rank=rank, split=split)
        if not mine:
            return []
        windows = read_samples(self.sources, mine, seq_len=self.sampler.seq_len)
        tokens = torch.from_numpy(windows).to(device)  # one copy to the device, then views
        micro = self.micro_batch_size
        return [
            (tokens[i : i + micro, :-1], tokens[i : i + micro, 1:])
            for i in range(0, len(mine), micro)
        ]

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream (the sampler's), JSON-serialisable."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; :class:`DataError` if it is another stream's."""
        self.sampler.load_state_dict(state)
