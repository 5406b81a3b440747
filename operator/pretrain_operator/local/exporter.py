"""The export of a local run (``spec.export``): the trainer's ``export`` command, one process
per try, its output in ``export/attempt-<n>.log`` of the run directory.

What the planner asks for (:class:`~pretrain_operator.plan.ExportTask`) runs here; what runs
is reported back (:class:`~pretrain_operator.plan.ExportRun`): running, exited 0, or failed
with its exit code and the last line it wrote (the command's one-line error).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from ..plan import ExportRun, ExportTask, WorkerState
from .processes import signal_tree

FOLDER = "export"


class Exporter:
    def __init__(self, *, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir, self.env = run_dir, env
        self.process: subprocess.Popen[bytes] | None = None
        self.attempt: int | None = None

    def log(self, attempt: int) -> Path:
        return self.run_dir / FOLDER / f"attempt-{attempt}.log"

    def observe(self) -> ExportRun | None:
        if self.process is None or self.attempt is None:
            return None
        code = self.process.poll()
        if code is None:
            return ExportRun(attempt=self.attempt, state=WorkerState.RUNNING)
        if code == 0:
            return ExportRun(attempt=self.attempt, state=WorkerState.SUCCEEDED, exit_code=0)
        return ExportRun(
            attempt=self.attempt,
            state=WorkerState.FAILED,
            exit_code=code,
            message=_last_line(self.log(self.attempt)),
        )

    def apply(self, task: ExportTask | None) -> None:
        """Run ``task``'s try (once), or stop any when there is none."""
        if task is None:
            self.stop()
            return
        if task.attempt == self.attempt:
            return
        self.stop()
        log = self.log(task.attempt)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pretrain_trainer", *task.arguments()],
                cwd=self.run_dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.attempt = task.attempt

    def stop(self, *, timeout: float = 10.0) -> None:
        process, self.process, self.attempt = self.process, None, None
        if process is None or process.poll() is not None:
            return
        signal_tree(process.pid, 15)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal_tree(process.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)


def _last_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return lines[-1][:500] if lines else None
