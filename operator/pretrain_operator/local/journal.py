"""What a local run remembers besides its status: the trainer's step log as it grows, and the
control plane's timeline (``events.jsonl``: every event with its time). From the step log come
the status' progress (step, tokens, loss, ETA) and the running attempt's usage, which goodput
and recoveries are accounted from as on Kubernetes (``telemetry.accounting``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pretrain_trainer.contract import StepRecord, parse_step
from pydantic import BaseModel, ConfigDict

from ..api import JobStatus, Phase, PretrainJobSpec, Reason, TrainerUsage
from ..plan import Event
from ..telemetry.progress import TrainerProgress, with_progress

EVENTS = "events.jsonl"
PROGRESS_EVERY = 5.0  # seconds between two progress updates of the status


class UsageFold:
    """The running attempt's :class:`TrainerUsage`, folded from its step records as they come:
    what rank 0's ``/metrics`` says on Kubernetes, here at every step."""

    def __init__(self) -> None:
        self.usage: TrainerUsage | None = None
        self._seconds_at: dict[int, float] = {}  # step seconds of the attempt at each step

    def add(self, record: StepRecord) -> None:
        if record.attempt is None:
            return
        usage = self.usage
        if usage is None or usage.attempt != record.attempt:
            start = record.startup
            usage = TrainerUsage(
                attempt=record.attempt,
                resumed_step=record.step - 1,
                launcher_time=start.launcher if start else None,
                group_time=start.group if start else None,
                engine_time=start.engine if start else None,
                restored_time=start.restored if start else None,
                first_step_time=record.time,
            )
            self._seconds_at = {}
        seconds = usage.step_seconds + record.seconds
        self._seconds_at[record.step] = seconds
        update: dict[str, object] = {
            "step": record.step,
            "steps": usage.steps + 1,
            "step_seconds": seconds,
            "restore_seconds": usage.restore_seconds + (record.restore_seconds or 0.0),
            "blocking_seconds": usage.blocking_seconds + (record.checkpoint_blocking or 0.0),
            "eval_seconds": usage.eval_seconds + (record.eval_seconds or 0.0),
            "last_step_time": record.time,
        }
        durable = record.checkpointed
        if durable is not None and durable in self._seconds_at:
            update |= {
                "checkpoint_step": durable,
                "checkpoint_step_seconds": self._seconds_at[durable],
                "checkpoint_time": record.time,
            }
            self._seconds_at = {k: v for k, v in self._seconds_at.items() if k > durable}
        self.usage = usage.model_copy(update=update)


class StepLog:
    """Follows the trainer's step log (JSON lines of :class:`StepRecord`) as it grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0
        self.last: StepRecord | None = None
        self.records: list[StepRecord] = []  # every step, less its per-expert detail
        self.usage = UsageFold()

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
                        self.usage.add(record)
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

    def usage(self) -> TrainerUsage | None:
        """The running attempt's usage, as of its newest step record."""
        self.steps.poll()
        return self.steps.usage.usage


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
