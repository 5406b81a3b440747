"""What one planning pass decides from: the spec, the workers seen, the time and the stage.

The policy modules take one frozen :class:`Pass` rather than the same four values in four
orders. The status travels beside it, explicitly, because every step returns a changed one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

from ..api import PretrainJobSpec
from .model import Observed


@dataclass(frozen=True)
class Pass:
    spec: PretrainJobSpec
    observed: Observed
    now: datetime
    stage: int
    """Index of the stage the pass is about: the current one, or the next after a completion."""

    @property
    def stage_name(self) -> str:
        return self.spec.stages[self.stage].name

    def next_stage(self) -> Pass:
        """The same pass about the stage after this one (a finished stage hands over)."""
        return replace(self, stage=self.stage + 1)
