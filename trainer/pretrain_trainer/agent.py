"""The worker agent: one long-lived process per worker slot that starts each attempt's trainer
processes when told to, with torch, DeepSpeed and the trainer already imported.

    python -m pretrain_trainer.agent --port PORT --nproc N --dir DIR [--host ADDRESS]

Its environment is the contract's, less what changes per attempt (stage, attempt, report). At
start it brings up a fork server (``multiprocessing``'s ``forkserver``) that imports the
trainer's runtime once (:mod:`.preload`); every trainer process is then a fork of it, ready in
milliseconds. The control plane talks to it over HTTP (JSON, the contract's records):

``GET /``            :class:`~.contract.AgentState`: its identity and latest attempt.
``GET /ready``       the same, with 503 once that attempt has ended: the pod's readiness
                     probe, so an attempt's end changes the pod and its watchers hear of it.
``PUT /attempt``     an :class:`~.contract.AttemptOrder`: start that attempt's processes
                     (ranks ``rank * N ... rank * N + N - 1`` of ``workers * N``), after
                     killing an older attempt's; the same order again is a no-op.
``POST /stop``       ``{"attempt": a, "graceSeconds": g}``: SIGTERM (the trainer may save),
                     SIGKILL after ``g`` seconds.

On SIGTERM (its pod deleted) it stops the running attempt the same way (``--grace``), then
exits.

Processes meet under the attempt's prefix in the job's store (``PRETRAIN_STORE``), at ranks the
planner chose, so no rendezvous round is needed. When one process fails the agent kills its
siblings (the group is broken), as torchrun does. Logs and reports go to
``DIR/attempt-<a>.log`` and ``DIR/report-<a>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Protocol

from . import contract
from .lifetime import die_with_parent

PRELOAD = ["pretrain_trainer.preload"]


AGENT_PID = "PRETRAIN_AGENT_PID"  # tells the fork server's preload who its agent is


def trainer_process(environ: dict[str, str], log: str) -> None:
    """A trainer rank, in a fork of the fork server: its own session (so it and anything it
    starts are signalled together), its output to the attempt's log, then ``main``."""
    os.setsid()
    die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(environ)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from .main import main

    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _nothing() -> None:
    """A fork server's first child: it proves the server is up and its imports are done."""


@dataclass
class _Attempt:
    order: contract.AttemptOrder
    processes: Sequence[BaseProcess]
    report: Path
    started_at: float
    ended_at: float | None = None
    exit_code: int | None = None
    killed: bool = False

    def poll(self) -> None:
        """Note exits; on the first failure, kill the siblings (the group is broken)."""
        if self.exit_code is not None:
            return
        codes = [p.exitcode for p in self.processes]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and any(c is None for c in codes):
            self.kill()
            return
        if all(c is not None for c in codes):
            first = failed[0] if failed else 0
            self.exit_code = 128 - first if first < 0 else first
            self.ended_at = time.time()

    def signal(self, signum: int) -> None:
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        for process in self.processes:
            process.join(timeout=30)
        self.poll()


@dataclass
class Agent:
    nproc: int
    folder: Path
    environ: dict[str, str]
    identity: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    current: _Attempt | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.environ[AGENT_PID] = str(os.getpid())  # the fork server's preload reads it
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        warm = self.context.Process(target=_nothing, name="warm-up")
        warm.start()  # returns once the fork server has imported everything: the agent is warm
        warm.join()

    def state(self) -> contract.AgentState:
        with self._lock:
            current = self.current
            if current is None:
                return contract.AgentState(agent=self.identity)
            current.poll()
            report = current.report.read_text() if current.report.is_file() else None
            return contract.AgentState(
                agent=self.identity,
                attempt=current.order.attempt,
                stage=current.order.stage,
                running=current.exit_code is None,
                exit_code=current.exit_code,
                started_at=current.started_at,
                ended_at=current.ended_at,
                report=report,
            )

    def run(self, order: contract.AttemptOrder) -> contract.AgentState:
        with self._lock:
            current = self.current
            if current is not None and current.order == order:
                pass  # already running (or ran) this order
            elif current is not None and current.order.attempt > order.attempt:
                raise ValueError(
                    f"attempt {order.attempt} is older than attempt {current.order.attempt}"
                )
            else:
                if current is not None:
                    current.kill()
                self.current = self._start(order)
        return self.state()

    def stop(self, attempt: int, *, grace: float) -> contract.AgentState:
        with self._lock:
            current = self.current
            if current is not None and current.order.attempt == attempt:
                current.poll()
                if current.exit_code is None and not current.killed:
                    current.killed = True
                    current.signal(signal.SIGTERM)
                    threading.Timer(grace, current.kill).start()
        return self.state()

    def _start(self, order: contract.AttemptOrder) -> _Attempt:
        launched = time.time()
        report = self.folder / f"report-{order.attempt}.json"
        report.unlink(missing_ok=True)
        log = str(self.folder / f"attempt-{order.attempt}.log")
        world = order.workers * self.nproc
        attempt_env = {}
        if order.run_config is not None:
            config = self.folder / f"run-{order.attempt}.yaml"
            config.write_text(order.run_config)
            attempt_env[contract.ENV_RUN_CONFIG] = str(config)
        processes = []
        for local in range(self.nproc):
            environ = {
                **self.environ,
                **attempt_env,
                contract.ENV_STAGE: str(order.stage),
                contract.ENV_ATTEMPT: str(order.attempt),
                contract.ENV_REPORT_PATH: str(report),
                contract.ENV_STORE: order.store or self.environ.get(contract.ENV_STORE, ""),
                contract.ENV_STORE_PREFIX: f"{self.environ.get(contract.ENV_JOB, '')}/a"
                f"{order.attempt}",
                contract.ENV_LAUNCHED_AT: repr(launched),
                "RANK": str(order.rank * self.nproc + local),
                "LOCAL_RANK": str(local),
                "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(self.nproc),
                "GROUP_RANK": str(order.rank),
            }
            process = self.context.Process(
                target=trainer_process, args=(environ, log), name=f"rank-{environ['RANK']}"
            )
            process.start()
            processes.append(process)
        return _Attempt(order, processes, report, launched)

    def close(self, *, grace: float = 0.0) -> None:
        """Stop the running attempt: SIGTERM (its trainers may save), SIGKILL after ``grace``."""
        with self._lock:
            current = self.current
            if current is None:
                return
            current.poll()
            if current.exit_code is None and grace > 0:
                current.signal(signal.SIGTERM)
                deadline = time.monotonic() + grace
                while current.exit_code is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                    current.poll()
            current.kill()


class Runs(Protocol):
    """What the HTTP interface drives: the :class:`Agent`, or anything that answers as one."""

    def state(self) -> contract.AgentState: ...

    def run(self, order: contract.AttemptOrder) -> contract.AgentState: ...

    def stop(self, attempt: int, *, grace: float) -> contract.AgentState: ...


def http_handler(agent: Runs) -> type[BaseHTTPRequestHandler]:
    """The agent's HTTP interface over ``agent`` (anything with its ``state``, ``run`` and
    ``stop``)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            del format, args  # quiet: the control plane polls often

        def _reply(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_GET(self) -> None:
            state = agent.state()
            if self.path == "/ready":  # the pod's readiness: its attempt has not ended
                self._reply(503 if state.exit_code is not None else 200, state.to_json())
                return
            self._reply(200, state.to_json())

        def do_PUT(self) -> None:
            order = contract.AttemptOrder.parse(self._body())
            if self.path != "/attempt" or order is None:
                self._reply(400, json.dumps({"error": "PUT /attempt takes an AttemptOrder"}))
                return
            try:
                self._reply(200, agent.run(order).to_json())
            except ValueError as error:
                self._reply(409, json.dumps({"error": str(error)}))

        def do_POST(self) -> None:
            try:
                body = json.loads(self._body())
                attempt, grace = int(body["attempt"]), float(body.get("graceSeconds", 30))
            except (ValueError, KeyError, TypeError):
                self._reply(400, json.dumps({"error": "POST /stop takes {attempt, graceSeconds}"}))
                return
            if self.path != "/stop":
                self._reply(404, json.dumps({"error": f"no {self.path}"}))
                return
            self._reply(200, agent.stop(attempt, grace=grace).to_json())

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=contract.AGENT_PORT)
    parser.add_argument("--host", default=os.environ.get(contract.ENV_LISTEN_HOST) or "0.0.0.0")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--dir", type=Path, required=True, help="logs and reports")
    parser.add_argument(
        "--grace", type=float, default=60.0, help="seconds trainers have to stop on SIGTERM"
    )
    args = parser.parse_args(argv)
    agent = Agent(nproc=args.nproc, folder=args.dir, environ=dict(os.environ))
    # Blocked only now: the fork server (started above) and its forks keep the usual mask,
    # and the HTTP thread (started below) inherits it, so the signals reach sigwait.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = ThreadingHTTPServer((args.host, args.port), http_handler(agent))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="agent-http", daemon=True).start()
    print(f"worker agent {agent.identity} ready on {args.host}:{args.port}", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.shutdown()
    agent.close(grace=args.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
