"""``pretrainctl run``: drive the planning core over the local backend until the job ends.

The loop is the operator's reconcile on this machine: observe the workers, ``plan()``, apply,
write the status (``status.json``, atomically) and report events. A second run on the same
directory resumes from that status and the checkpoints; a directory that holds another job is
refused. Ctrl-C suspends: workers get SIGTERM (they save), the status says Suspended. A run of
a job that Failed (a full disk, say) retries it from its newest checkpoint once the cause is
fixed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pretrain_trainer.fsio import write_json_atomic

from ..api import JobStatus, Phase, PretrainJob
from ..plan import Event, Plan, plan
from ..telemetry.accounting import accounted
from ..telemetry.metrics import JobSnapshot, OperatorMetrics
from .backend import LocalBackend, read_capacity, write_capacity
from .journal import Journal
from .store import StoreError, StoreProcess

STATUS = "status.json"
JOB = "job.json"
TICK = 0.5


class RunError(Exception):
    """The run cannot start: the message says why, on one line."""


@dataclass(frozen=True)
class Update:
    status: JobStatus
    events: tuple[Event, ...]
    plan: Plan


def _dump(status: JobStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True)


def prepare(job: PretrainJob, run_dir: Path, *, workers: int | None) -> JobStatus:
    """Claim ``run_dir`` for ``job`` (or check it is already its own), write the run config and
    capacity; return the status to resume from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    owner = run_dir / JOB
    identity = {"job": job.name, "stages": [s.name for s in job.spec.stages]}
    if owner.exists():
        found = json.loads(owner.read_text())
        if found != identity:
            raise RunError(
                f"{run_dir} holds job {found.get('job')!r} (stages {found.get('stages')}), "
                f"not {job.name!r}: choose another --dir"
            )
    else:
        write_json_atomic(owner, identity, durable=False)
    (run_dir / "run.yaml").write_text(job.spec.run_config_yaml())
    capacity, down = read_capacity(run_dir)
    wanted = workers if workers is not None else (capacity or job.spec.elastic.max_count)
    write_capacity(run_dir, wanted, down if workers is None else set())
    try:
        return JobStatus.model_validate(json.loads((run_dir / STATUS).read_text()))
    except (OSError, ValueError):
        return JobStatus()


def run(
    job: PretrainJob,
    run_dir: Path,
    *,
    workers: int | None = None,
    on_update: Callable[[Update], None] = lambda update: None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    metrics_port: int | None = None,
) -> JobStatus:
    """Run ``job`` to the end (Succeeded or Failed); Ctrl-C suspends it. With
    ``metrics_port``, the control plane's series (phase, restarts, workers, goodput...) are
    served there and each worker slot's trainer on ``metrics_port + 1 + slot``."""
    run_dir = run_dir.resolve()  # workers run inside it, and their paths must not depend on it
    status = prepare(job, run_dir, workers=workers)
    if status.phase == Phase.SUCCEEDED:
        return status
    if status.phase == Phase.FAILED:  # run again once the cause is fixed: resume, fresh back-off
        status = status.model_copy(
            update={"phase": Phase.SUSPENDED, "failures_in_a_row": 0, "next_attempt_at": None}
        )
    try:
        store = StoreProcess().start()
    except StoreError as error:
        raise RunError(str(error)) from None
    backend = LocalBackend(
        job=job,
        run_dir=run_dir,
        store_port=store.port,
        metrics_port=metrics_port + 1 if metrics_port else None,
    )
    journal = Journal(run_dir)
    metrics = OperatorMetrics() if metrics_port else None
    server = _serve(metrics, metrics_port) if metrics is not None and metrics_port else None
    spec = job.spec
    try:
        while True:
            started = time.perf_counter()
            observed = backend.observe()
            result = plan(spec=spec, status=status, observed=observed, now=clock())
            backend.apply(result)
            journal.note(result.events, result.status, now=time.time())
            planned = journal.progress(result.status, spec, now=time.time())
            status = accounted(
                status,
                planned,
                events=result.events,
                observed=observed,
                usage=journal.usage(),
                now=time.time(),
            )
            write_json_atomic(run_dir / STATUS, _dump(status), durable=False)
            if metrics is not None:
                metrics.reconcile_seconds.observe(time.perf_counter() - started)
                metrics.jobs[("local", job.name)] = JobSnapshot("local", job.name, status)
            on_update(Update(status, result.events, result))
            if status.phase in (Phase.SUCCEEDED, Phase.FAILED):
                return status
            wait = result.requeue_after
            time.sleep(TICK if wait is None else min(TICK, max(wait, 0.05)))
    except KeyboardInterrupt:
        backend.shutdown()
        suspended = plan(
            spec=spec.model_copy(update={"suspend": True}),
            status=status,
            observed=backend.observe(),
            now=clock(),
        ).status
        journal.suspended(now=time.time())
        write_json_atomic(run_dir / STATUS, _dump(suspended), durable=False)
        return suspended
    finally:
        backend.shutdown()
        store.close()
        if server is not None:
            server.shutdown()


def _serve(metrics: OperatorMetrics, port: int) -> Any:
    from prometheus_client import start_http_server

    server, _ = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    return server
