"""Trainer metrics (docs/design.md, "Observability") and the health endpoint, served on one port.

``/metrics`` is Prometheus text; ``/healthz`` answers 503 once no training step has finished
for ``step_timeout`` seconds, so a liveness probe restarts a hung worker. Each process serves
one port per worker (local rank 0: every series is global, and a hang anywhere stalls the
collectives of local rank 0 too); labels are bounded (namespace, job, stage).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from . import contract

PREFIX = "pretrainjob_"
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
SAVE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class TrainerMetrics:
    """All trainer-side series for one process; ``labels`` are fixed for its lifetime."""

    def __init__(self, *, namespace: str, job: str, stage: str) -> None:
        self.registry = CollectorRegistry()
        names = ("namespace", "job", "stage")
        values = (namespace, job, stage)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(PREFIX + name, doc, names, registry=self.registry).labels(*values)

        def counter(name: str, doc: str) -> Any:
            return Counter(PREFIX + name, doc, names, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: Iterable[float]) -> Any:
            return Histogram(
                PREFIX + name, doc, names, buckets=tuple(buckets), registry=self.registry
            ).labels(*values)

        self.step = gauge("step", "Optimizer steps completed in the current stage.")
        self.loss = gauge("loss", "Training loss of the last step (mean over the global batch).")
        self.tokens = counter("tokens", "Tokens trained by this process's group (for rates).")
        self.stage_tokens = gauge(
            "stage_tokens", "Tokens trained in the current stage so far (restored ones included)."
        )
        self.tokens_per_second = gauge("tokens_per_second", "Global training throughput.")
        self.step_seconds = histogram("step_seconds", "Wall time of one step.", STEP_BUCKETS)
        self.learning_rate = gauge("learning_rate", "Learning rate of the last step.")
        self.grad_norm = gauge("grad_norm", "Global gradient norm before clipping.")
        self.skipped_steps = counter(
            "skipped_steps", "Steps skipped by the stability guard (non-finite or spiking norm)."
        )
        self.world_size = gauge("world_size", "Trainer processes in the current attempt.")
        self.checkpoint_save_seconds = histogram(
            "checkpoint_save_seconds", "Total time to write a checkpoint.", SAVE_BUCKETS
        )
        self.checkpoint_save_blocking_seconds = histogram(
            "checkpoint_save_blocking_seconds",
            "Time training was blocked by a checkpoint save.",
            SAVE_BUCKETS,
        )
        self.checkpoint_restore_seconds = gauge(
            "checkpoint_restore_seconds", "Time of the last checkpoint restore."
        )
        self.last_step_timestamp = gauge(
            "last_step_timestamp_seconds", "Unix time the last step finished."
        )
        self.last_checkpoint_timestamp = gauge(
            "last_checkpoint_timestamp_seconds",
            "Unix time the newest checkpoint became complete (global rank 0 reports it).",
        )
        self.last_checkpoint_step = gauge(
            "last_checkpoint_step", "Step of the newest complete checkpoint (global rank 0)."
        )
        self.checkpoint_interval_steps = gauge(
            "checkpoint_interval_steps", "Steps between two checkpoints (checkpoint.intervalSteps)."
        )
        # What the control plane accounts an attempt with (docs/design.md, "Goodput"): the
        # step_seconds histogram's sum, the restore, the blocking histogram's sum, and these.
        self.attempt = gauge("attempt", "The attempt this process trains for.")
        self.resumed_step = gauge(
            "resumed_step", "The step this attempt started from (0 at a stage's start)."
        )
        self.checkpoint_step_seconds = gauge(
            "checkpoint_step_seconds",
            "Seconds this process spent inside steps up to the newest durable checkpoint it "
            "wrote (the rest would be redone after a failure).",
        )
        self._startup = Gauge(
            PREFIX + "startup_timestamp_seconds",
            "When this attempt's start reached each point: launcher, group (process group up), "
            "engine (DeepSpeed ready), restored, first_step (Unix time).",
            (*names, "event"),
            registry=self.registry,
        )
        self._expert_load = Gauge(
            PREFIX + "moe_expert_load",
            "Fraction of tokens routed to each expert (mean over MoE layers, last step).",
            (*names, "expert"),
            registry=self.registry,
        )
        self.eval_seconds = counter(
            "eval_seconds", "Seconds spent measuring the held-out loss (data.evalSources)."
        )
        self._eval_loss = Gauge(
            PREFIX + "eval_loss",
            "Held-out loss per token on each eval source, at the stage's newest evaluation.",
            (*names, "source"),
            registry=self.registry,
        )
        self._eval_perplexity = Gauge(
            PREFIX + "eval_perplexity",
            "Held-out perplexity (exp of eval_loss) on each eval source.",
            (*names, "source"),
            registry=self.registry,
        )
        self._labels = values
        for unknown in (self.loss, self.tokens_per_second, self.learning_rate, self.grad_norm):
            unknown.set(float("nan"))  # not zero: nothing is known before the first step

    def startup(self, event: str, timestamp: float) -> None:
        self._startup.labels(*self._labels, event).set(timestamp)

    def held_out(self, source: str, *, loss: float, perplexity: float) -> None:
        self._eval_loss.labels(*self._labels, source).set(loss)
        self._eval_perplexity.labels(*self._labels, source).set(perplexity)

    def expert_load(self, loads: Iterable[float]) -> None:
        for expert, load in enumerate(loads):
            self._expert_load.labels(*self._labels, str(expert)).set(load)


class Health:
    """Tracks training progress for /healthz."""

    def __init__(self, *, step_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.step_timeout, self.clock = step_timeout, clock
        self.last_progress = clock()

    def progressed(self) -> None:
        self.last_progress = self.clock()

    def stalled_for(self) -> float:
        return self.clock() - self.last_progress

    def healthy(self) -> bool:
        return self.stalled_for() <= self.step_timeout


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(
    *, port: int, metrics: TrainerMetrics, health: Health, patience: float = 30.0
) -> WSGIServer:
    """Serve /metrics and /healthz on ``port`` (0 picks a free one) from a daemon thread. A
    port still held (the previous attempt's trainer on this host, saving on its way out) is
    tried again for up to ``patience`` seconds."""
    metrics_app = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok = health.healthy()
            body = f"{'ok' if ok else 'stalled'}: last step {health.stalled_for():.0f}s ago\n"
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [body.encode()]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    host = os.environ.get(contract.ENV_LISTEN_HOST) or "0.0.0.0"
    deadline = time.monotonic() + patience
    while True:
        try:
            server = make_server(host, port, app, handler_class=_QuietHandler)
            break
        except OSError as error:
            if error.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
