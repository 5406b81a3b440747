"""Held-out evaluation: a stage's loss and perplexity on each of ``data.evalSources``.

What is evaluated depends on the source and the stage alone, never on the world: each source
gives ``batches x globalBatchSize`` non-overlapping windows of the stage's sequence length,
spread evenly over it (:func:`window_offsets`). The data-parallel ranks take contiguous shares
of them, sum the cross-entropy of every token in float64, and one all-reduce adds the sums, so
any world size gives the same loss (to float rounding, far below 1e-5).

Every rank runs as many forward passes as the rank with the most windows, the missing rows
padded with targets that count in no loss (``model.IGNORE``): forwards that are collective
(ZeRO-3 gathers, expert all-to-alls, the pipeline's sends and its barrier) stay in step.
Tensor-parallel ranks of one replica compute the same sums; the total is divided by the
replicas that hold each share. Under a pipeline, DeepSpeed's ``eval_batch`` runs the
micro-batches with the summing loss (``parallel.pipeline.held_out_loss``) and averages over
micro-batches and data-parallel ranks, which is multiplied back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import Evaluation, RunConfig
from .data.shards import DataError, TokenSource, check_vocab, open_source, read_samples
from .model import IGNORE

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine


def window_offsets(tokens: int, *, seq_len: int, count: int) -> npt.NDArray[np.int64]:
    """The starts of ``count`` non-overlapping windows of ``seq_len + 1`` tokens spread evenly
    over a source of ``tokens`` (fewer when it holds fewer whole windows)."""
    whole = tokens // (seq_len + 1)
    n = min(count, whole)
    return (np.arange(n, dtype=np.int64) * whole // max(n, 1)) * (seq_len + 1)


def share(count: int, *, rank: int, ranks: int) -> slice:
    """Rank ``rank``'s contiguous share of ``count`` items over ``ranks`` (sizes differ by at
    most one)."""
    return slice(rank * count // ranks, (rank + 1) * count // ranks)


@dataclass(frozen=True)
class HeldOut:
    """One eval source and the windows read from it."""

    name: str
    source: TokenSource
    offsets: npt.NDArray[np.int64]

    @property
    def windows(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class Ranks:
    """Where this rank sits for evaluation."""

    data_rank: int
    data_ranks: int
    replicas: int
    """Ranks that compute the same share (a replica's tensor ranks)."""
    pipelined: bool = False


class Evaluator:
    """A stage's held-out sets and the forward passes that measure them."""

    def __init__(
        self, *, evaluation: Evaluation, sets: list[HeldOut], seq_len: int, micro_batch_size: int
    ) -> None:
        self.evaluation, self.sets = evaluation, sets
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size

    @classmethod
    def build(cls, config: RunConfig, *, stage_index: int) -> Evaluator | None:
        """The stage's evaluator, None when the job has no eval sources. Every problem with
        the held-out data raises :class:`DataError` here, before the first step."""
        evaluation = config.evaluation(stage_index)
        if evaluation is None:
            return None
        stage = config.stages[stage_index]
        seq_len = stage.seq_len_for(config.model)
        paths = {s.name: s.path for s in config.data.eval_sources}
        sets = []
        for name in evaluation.names(list(paths)):
            try:
                source = open_source(paths[name])
                check_vocab(source, config.model.vocab_size)
            except DataError as error:
                raise DataError(f"eval source {name!r}: {error}") from None
            offsets = window_offsets(
                len(source), seq_len=seq_len, count=evaluation.batches * stage.global_batch_size
            )
            if not len(offsets):
                raise DataError(
                    f"eval source {name!r}: {len(source)} tokens hold no window of "
                    f"{seq_len + 1} (the stage's seqLen + 1)"
                )
            sets.append(HeldOut(name, source, offsets))
        return cls(
            evaluation=evaluation,
            sets=sets,
            seq_len=seq_len,
            micro_batch_size=stage.micro_batch_size,
        )

    def due(self, step: int, *, last_step: bool) -> bool:
        return self.evaluation.due(step, last_step=last_step)

    def run(self, engine: DeepSpeedEngine, *, ranks: Ranks) -> dict[str, float]:
        """Every source's mean held-out loss per token (the same on every rank). Collective:
        every rank of the world calls it at the same step."""
        sums = torch.zeros(len(self.sets), dtype=torch.float64)
        engine.eval()
        try:
            with torch.no_grad():
                for i, held_out in enumerate(self.sets):
                    chunks = list(self._chunks(held_out, ranks, device=engine.device))
                    sums[i] = (
                        self._pipelined(engine, chunks, ranks)
                        if ranks.pipelined
                        else self._forward(engine, chunks)
                    )
        finally:
            engine.train()
        if not ranks.pipelined:  # the pipeline engine already reduced over its ranks
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(sums)
            sums /= ranks.replicas
        return {
            s.name: float(sums[i]) / (s.windows * self.seq_len) for i, s in enumerate(self.sets)
        }

    def _chunks(
        self, held_out: HeldOut, ranks: Ranks, *, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's windows as micro-batches, padded to the longest rank's count."""
        mine = held_out.offsets[
            share(held_out.windows, rank=ranks.data_rank, ranks=ranks.data_ranks)
        ]
        most = math.ceil(math.ceil(held_out.windows / ranks.data_ranks) / self.micro_batch_size)
        rows = most * self.micro_batch_size
        windows = np.zeros((rows, self.seq_len + 1), dtype=np.int64)
        windows[: len(mine)] = read_samples(
            {held_out.name: held_out.source},
            [(held_out.name, int(o)) for o in mine],
            seq_len=self.seq_len,
        )
        tokens = torch.from_numpy(windows)
        inputs, targets = tokens[:, :-1].clone(), tokens[:, 1:].clone()
        targets[len(mine) :] = IGNORE
        for start in range(0, rows, self.micro_batch_size):
            end = start + self.micro_batch_size
            yield inputs[start:end].to(device), targets[start:end].to(device)

    @staticmethod
    def _forward(engine: DeepSpeedEngine, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        total = 0.0
        for inputs, targets in chunks:
            logits = engine(inputs)
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).double(),
                    targets.reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
        return total

    @staticmethod
    def _pipelined(
        engine: DeepSpeedEngine, chunks: list[tuple[torch.Tensor, torch.Tensor]], ranks: Ranks
    ) -> float:
        from .parallel.pipeline import held_out_loss

        module, training_loss = engine.module, engine.module.loss_fn
        module.loss_fn = held_out_loss
        try:
            mean = engine.eval_batch(iter(chunks), num_micro_batches=len(chunks))
        finally:
            module.loss_fn = training_loss
        # eval_batch averages over the micro-batches and the data-parallel ranks.
        return float(mean) * len(chunks) * ranks.data_ranks


def perplexity(loss: float) -> float:
    """exp(loss), infinite where that overflows."""
    return math.exp(loss) if loss < 700 else math.inf
