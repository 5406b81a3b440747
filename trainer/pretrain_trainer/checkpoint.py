"""Where a stage's DeepSpeed checkpoints live, and how a stage starts from the previous one.

Layout: ``<root>/<job>/stage-<s>/step-<n>/`` (DeepSpeed files) with DeepSpeed's ``latest``
pointer per stage directory. A restart inside a stage restores everything (weights, optimizer,
LR schedule, data position); a stage's first run loads only the previous stage's final weights,
since the new stage has its own optimizer settings, schedule and data mix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def stage_dir(root: Path, stage: int) -> Path:
    return root / f"stage-{stage}"


def latest_tag(directory: Path) -> str | None:
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag if tag and (directory / tag).is_dir() else None


@dataclass(frozen=True)
class Restored:
    path: Path
    client_state: dict[str, Any]
    seconds: float
    full: bool  # everything (same stage) or weights only (previous stage)


class Checkpoints:
    def __init__(self, *, root: Path, stage: int) -> None:
        self.root, self.stage = root, stage
        self.directory = stage_dir(root, stage)

    def save(self, engine: Any, *, step: int, client_state: dict[str, Any]) -> tuple[Path, float]:
        started = time.perf_counter()
        tag = f"step-{step}"
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state)
        return self.directory / tag, time.perf_counter() - started

    def restore(self, engine: Any) -> Restored | None:
        """Resume this stage if it has a checkpoint, else start from the previous stage's
        final weights, else (first stage, first run) return None."""
        started = time.perf_counter()
        tag = latest_tag(self.directory)
        if tag is not None:
            path, state = engine.load_checkpoint(str(self.directory), tag=tag)
            if path is None:
                raise RuntimeError(f"cannot load checkpoint {self.directory / tag}")
            return Restored(self.directory / tag, state or {}, time.perf_counter() - started, True)
        if self.stage == 0:
            return None
        previous = stage_dir(self.root, self.stage - 1)
        tag = latest_tag(previous)
        if tag is None:
            raise FileNotFoundError(
                f"stage {self.stage} starts from stage {self.stage - 1}'s final checkpoint, "
                f"but {previous} holds none"
            )
        path, state = engine.load_checkpoint(
            str(previous),
            tag=tag,
            load_module_only=True,
            load_optimizer_states=False,
            load_lr_scheduler_states=False,
        )
        if path is None:
            raise RuntimeError(f"cannot load checkpoint {previous / tag}")
        return Restored(previous / tag, {}, time.perf_counter() - started, False)
