"""Held-out evaluation of a stage: which sources, how often, how much.

A stage is evaluated on the job's ``data.evalSources`` (token shards kept out of training) at
its end, and every ``intervalSteps`` steps when set. Each source contributes a fixed set of
windows, ``batches`` global batches of the stage's sequences, chosen from the source alone
(never from the world size), so the same checkpoint gives the same eval loss on any number of
workers (``pretrain_trainer.evaluate``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from pydantic import Field

from .base import SOURCE_NAME, Count, Problem, Spec

SourceName = Annotated[str, Field(pattern=SOURCE_NAME, max_length=63)]


class Evaluation(Spec):
    """When and on what a stage's held-out loss is measured."""

    sources: Annotated[list[SourceName], Field(min_length=1, max_length=16)] | None = None
    """Names from data.evalSources; all of them by default."""
    interval_steps: Count | None = None
    """Also evaluate every this many steps (always at the stage's end)."""
    batches: Annotated[int, Field(ge=1, le=100000)] = 4
    """Global batches (of the stage's globalBatchSize sequences) per source; fewer where a
    source holds fewer whole windows."""

    def names(self, known: list[str]) -> list[str]:
        """The eval sources this stage reads, in the order given (``known``'s by default)."""
        return list(self.sources) if self.sources is not None else list(known)

    def problems(self, known: list[str]) -> Iterator[Problem]:
        if not known:
            yield Problem((), "needs data.evalSources: no held-out source is defined")
            return
        seen: set[str] = set()
        for i, name in enumerate(self.sources or []):
            if name not in known:
                yield Problem(
                    ("sources", i),
                    f"unknown eval source {name!r}; data.evalSources has {', '.join(known)}",
                )
            elif name in seen:
                yield Problem(("sources", i), f"{name!r} is listed twice")
            seen.add(name)

    def due(self, step: int, *, last_step: bool) -> bool:
        """Whether the stage evaluates after ``step``."""
        return last_step or (self.interval_steps is not None and step % self.interval_steps == 0)
