"""The live terminal view of a local run and its closing summary (rich)."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..api import JobStatus, PretrainJob
from ..telemetry.goodput import goodput
from ..telemetry.recovery import PHASES, TOTAL
from .journal import StepLog
from .runner import Update


class Display:
    def __init__(self, job: PretrainJob, run_dir: Path, console: Console) -> None:
        self.job, self.console = job, console
        self.steps = StepLog(run_dir / "steps.jsonl")
        self.latest = run_dir / "checkpoints" / job.name / "latest"
        self.events: deque[str] = deque(maxlen=8)
        self.started = time.monotonic()
        self.live = Live(console=console, refresh_per_second=4, transient=False)

    def __enter__(self) -> Display:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def update(self, update: Update) -> None:
        for event in update.events:
            clock = time.strftime("%H:%M:%S")
            self.events.append(f"{clock} {event.reason}: {event.message}")
        self.live.update(self.render(update.status))

    def render(self, status: JobStatus) -> Group:
        spec, record = self.job.spec, self.steps.poll()
        index = status.stage.index if status.stage is not None else 0
        stage = spec.stages[index]
        total = stage.total_steps(spec.model)
        current = record if record is not None and record.stage == index else None
        step = current.step if current is not None else 0
        head = Text.assemble(
            (f"{self.job.name} ", "bold"),
            (f"{status.phase}", "cyan"),
            f"  stage {index + 1}/{len(spec.stages)} {stage.name}",
            f"  workers {status.workers.ready}/{status.workers.desired}",
            f"  attempt {status.attempt}  restarts {status.restarts.total}",
        )
        line = Text(f"step {step}/{total}")
        if current is not None:
            rate = (current.tokens / max(current.step, 1)) / max(current.seconds, 1e-9)
            loss = f"{current.loss:.4f}" if current.loss is not None else "-"
            line.append(
                f"  loss {loss}  lr {current.lr:.3g}  "
                f"tokens/s {rate:,.0f}  world size {current.world_size}"
            )
        parts: list[Any] = [head, ProgressBar(total=total, completed=step, width=60), line]
        with contextlib.suppress(OSError):
            parts.append(Text(f"last checkpoint {self.latest.read_text().strip()}"))
        parts += [Text(e, style="dim") for e in self.events]
        return Group(*parts)


def results_table(job: PretrainJob, status: JobStatus) -> Table:
    """What each stage did, printed when a local run ends."""
    table = Table(title=f"{job.name}: {status.phase}")
    sources = sorted({source for r in status.stages for source in r.eval_loss or {}})
    columns = ("stage", "steps", "tokens", "final loss", *(f"eval {s}" for s in sources))
    for column in (*columns, "time", "checkpoint"):
        table.add_column(column)
    for record in status.stages:
        seconds = (
            (record.finished_at - record.started_at).total_seconds()
            if record.finished_at and record.started_at
            else 0.0
        )
        table.add_row(
            record.name,
            str(record.step or 0),
            f"{record.tokens or 0:,}",
            f"{record.loss:.4f}" if record.loss is not None else "-",
            *(_held_out((record.eval_loss or {}).get(source)) for source in sources),
            f"{seconds:.0f}s",
            record.checkpoint or "-",
        )
    restarts = ", ".join(f"{k} {v}" for k, v in status.restarts.by_reason.items()) or "none"
    caption = f"restarts: {restarts}"
    figures = goodput(status, now=time.time())
    if figures is not None and figures.wall > 0:
        lost = ", ".join(f"{k} {v:.1f}s" for k, v in figures.badput.items() if v >= 0.05)
        caption += f"\ngoodput {figures.ratio:.1%} of {figures.wall:.0f}s"
        caption += f" (badput: {lost or 'none'})"
    table.caption = caption
    return table


def _held_out(loss: float | None) -> str:
    """A held-out loss with its perplexity, for the results table."""
    return "-" if loss is None else f"{loss:.4f} (ppl {math.exp(min(loss, 700)):.2f})"


def recovery_table(status: JobStatus) -> Table | None:
    """Every recovery's phases in seconds: the last one, and the mean over all of them."""
    history, last = status.recoveries, status.last_recovery
    if last is None or not history.count:
        return None
    table = Table(title="recoveries")
    for column in ("phase", "last (s)", f"mean of {history.count} (s)"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    seconds = {**last.phases.model_dump(), TOTAL: last.total_seconds}
    for phase in (*PHASES, TOTAL):
        mean = history.sums.get(phase, 0.0) / history.count
        table.add_row(phase.replace("_", " "), f"{seconds[phase]:.2f}", f"{mean:.2f}")
    return table
