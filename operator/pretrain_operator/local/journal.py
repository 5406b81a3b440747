"""What a local run remembers besides its status: the trainer's step log as it grows, and the
control plane's timeline (``events.jsonl``: every event with its time). From the two come the
status' progress (step, tokens, loss, ETA) and the job's goodput.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pretrain_trainer.contract import StepRecord, parse_step
from pydantic import BaseModel, ConfigDict

from ..api import JobStatus, Phase, PretrainJobSpec, Reason
from ..plan import FAILURES, Event
from ..telemetry.goodput import Attempt, Goodput, account
from ..telemetry.progress import TrainerProgress, with_progress

EVENTS = "events.jsonl"
PROGRESS_EVERY = 5.0  # seconds between two progress updates of the status
STARTS = {
    Reason.CREATED: "startup",
    Reason.RESTARTED: "restart",
    Reason.RESIZED: "restart",
    Reason.RESUMED: "restart",
    Reason.STAGE_COMPLETED: "stage_transition",
}


class StepLog:
    """Follows the trainer's step log (JSON lines of :class:`StepRecord`) as it grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.last: StepRecord | None = None
        self.records: list[StepRecord] = []  # every step, less its per-expert detail

    def poll(self) -> StepRecord | None:
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                for line in log:
                    if not line.endswith(b"\n"):
                        break  # a record being written: next time
                    self.offset += len(line)
                    record = parse_step(line)
                    if record is not None:
                        self.last = record
                        self.records.append(record.slim())
        except OSError:
            pass
        return self.last


class Entry(BaseModel):
    """One line of ``events.jsonl``: an event of the control plane, and when it happened."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    time: float
    """Unix time."""
    reason: str
    message: str = ""


@dataclass
class Journal:
    run_dir: Path
    timeline: list[Entry] = field(default_factory=list)
    steps: StepLog = field(init=False)
    _progressed: float = 0.0
    _waiting: bool = False

    def __post_init__(self) -> None:
        self.steps = StepLog(self.run_dir / "steps.jsonl")
        try:
            lines = (self.run_dir / EVENTS).read_text().splitlines()
            self.timeline = [Entry.model_validate_json(line) for line in lines if line.strip()]
        except (OSError, ValueError):
            self.timeline = []

    def note(self, events: Iterable[Event], status: JobStatus, *, now: float) -> None:
        """Append the plan's events (and the start of a wait for workers) to the timeline."""
        entries = [Entry(time=now, reason=e.reason, message=e.message) for e in events]
        waiting = status.phase in (Phase.PENDING, Phase.RESTARTING) and any(
            c.reason == Reason.WAITING_FOR_WORKERS for c in status.conditions
        )
        if waiting and not self._waiting:
            waits = Entry(
                time=now, reason=Reason.WAITING_FOR_WORKERS, message="waiting for workers"
            )
            entries.append(waits)
        self._waiting = waiting
        if not entries:
            return
        self.timeline.extend(entries)
        with (self.run_dir / EVENTS).open("a") as out:
            out.writelines(e.model_dump_json() + "\n" for e in entries)

    def suspended(self, *, now: float) -> None:
        self.note([Event(Reason.SUSPENDED, "suspended")], JobStatus(), now=now)

    # -- derived -----------------------------------------------------------------------------
    def progress(self, status: JobStatus, spec: PretrainJobSpec, *, now: float) -> JobStatus:
        """``status`` with the newest step, tokens, loss and the stage's ETA; at most every
        PROGRESS_EVERY seconds, so the status is not rewritten at every step."""
        record = self.steps.poll()
        if record is None or now - self._progressed < PROGRESS_EVERY:
            return status
        updated = with_progress(
            status, spec, _progress(self.steps.records[-50:], record), now=_utc(record.time)
        )
        if updated is not status:
            self._progressed = now
        return updated

    def goodput(self, *, now: float | None = None) -> Goodput | None:
        self.steps.poll()
        if not self.timeline:
            return None
        now = time.time() if now is None else now
        attempts, waiting, suspended = [], [], []
        lost_at: float | None = None
        wait_from: float | None = None
        pause_from: float | None = None
        for entry in self.timeline:
            at, reason = entry.time, entry.reason
            if reason in FAILURES and lost_at is None:
                lost_at = at
            elif reason == Reason.WAITING_FOR_WORKERS and wait_from is None:
                wait_from = at
            elif reason == Reason.SUSPENDED and pause_from is None:
                pause_from = at
            if reason in STARTS and not entry.message.startswith("job "):
                cause = STARTS[Reason(reason)]
                attempts.append(Attempt(at, cause, lost_at if cause == "restart" else None))
                lost_at = None
                if wait_from is not None:
                    waiting.append((wait_from, at))
                    wait_from = None
                if pause_from is not None:
                    suspended.append((pause_from, at))
                    pause_from = None
        if wait_from is not None:
            waiting.append((wait_from, now))
        if pause_from is not None:
            suspended.append((pause_from, now))
        return account(
            started=self.timeline[0].time,
            now=now,
            steps=self.steps.records,
            attempts=attempts,
            waiting=waiting,
            suspended=suspended,
        )


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _progress(recent: list[StepRecord], last: StepRecord) -> TrainerProgress:
    """The newest record, at the step time of the recent records of its stage."""
    same = [r for r in recent if r.stage == last.stage]
    per_step = None
    if len(same) >= 2 and same[-1].step > same[0].step:
        per_step = (same[-1].time - same[0].time) / (same[-1].step - same[0].step)
    return TrainerProgress(
        stage=last.stage,
        step=last.step,
        tokens=last.tokens,
        loss=last.loss,
        seconds_per_step=per_step,
    )
