"""A running job's progress (step, tokens, loss, step time), read from the trainer's own
``/metrics`` on the worker that hosts rank 0.

The caller reads it at a bounded rate and folds it into the pass's one status write
(:func:`~pretrain_operator.telemetry.progress.with_progress` computes the ETA): the status is
not a metrics store, so ``kubectl get ptj`` shows where a job is without rewriting the object
at every step. A worker that does not answer within two seconds costs nothing but a stale
column.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ..api import TrainerUsage
from ..telemetry.progress import TrainerProgress
from .objects import ATTEMPT, RANK, ROLE, WORKER

TIMEOUT = 2.0


PREFIX = "pretrainjob_"


def parse(text: str) -> TrainerProgress | None:
    """Progress and usage from a trainer's Prometheus exposition; None before it has any."""
    values: dict[str, float] = {}
    startup: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix(PREFIX)
            if name == "startup_timestamp_seconds":
                startup[sample.labels.get("event", "")] = sample.value
            else:
                values[name] = sample.value
    if "step" not in values:
        return None
    count = values.get("step_seconds_count", 0.0)
    loss = values.get("loss")
    return TrainerProgress(
        stage=None,
        step=int(values["step"]),
        tokens=int(values.get("stage_tokens", 0.0)),
        loss=loss if loss is not None and loss == loss else None,  # NaN: no step yet
        seconds_per_step=values["step_seconds_sum"] / count if count else None,
        usage=_usage(values, startup),
    )


def _usage(values: dict[str, float], startup: dict[str, float]) -> TrainerUsage | None:
    """The attempt's cumulative usage, from a trainer that exports it (``attempt``)."""
    if "attempt" not in values:
        return None
    steps = int(values.get("step_seconds_count", 0.0))
    checkpoint_seconds = values.get("checkpoint_step_seconds", 0.0)
    checkpoint_step = int(values.get("last_checkpoint_step", 0.0))
    resumed = int(values.get("resumed_step", 0.0))
    written = checkpoint_seconds > 0 and checkpoint_step > resumed  # by this attempt

    def positive(value: float | None) -> float | None:
        return value if value else None  # absent, or a gauge never set (0)

    return TrainerUsage(
        attempt=int(values["attempt"]),
        resumed_step=resumed,
        step=int(values["step"]),
        steps=steps,
        step_seconds=values.get("step_seconds_sum", 0.0),
        restore_seconds=values.get("checkpoint_restore_seconds", 0.0),
        blocking_seconds=values.get("checkpoint_save_blocking_seconds_sum", 0.0),
        eval_seconds=values.get("eval_seconds_total", 0.0),
        checkpoint_step=checkpoint_step if written else None,
        checkpoint_step_seconds=checkpoint_seconds if written else 0.0,
        checkpoint_time=positive(values.get("last_checkpoint_timestamp_seconds"))
        if written
        else None,
        last_step_time=positive(values.get("last_step_timestamp_seconds")) if steps else None,
        launcher_time=positive(startup.get("launcher")),
        group_time=positive(startup.get("group")),
        engine_time=positive(startup.get("engine")),
        restored_time=positive(startup.get("restored")),
        first_step_time=positive(startup.get("first_step")),
    )


def rank0_address(pods: Sequence[Mapping[str, Any]], attempt: int) -> str | None:
    for pod in pods:
        labels = pod["metadata"].get("labels", {})
        if (labels.get(ROLE), labels.get(ATTEMPT), labels.get(RANK)) == (WORKER, str(attempt), "0"):
            ip = pod.get("status", {}).get("podIP")
            return str(ip) if ip else None
    return None


def fetch(address: str, port: int) -> TrainerProgress | None:
    try:
        url = f"http://{address}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return parse(response.read().decode())
    except (OSError, ValueError):
        return None


def read(pods: Sequence[Mapping[str, Any]], attempt: int, *, port: int) -> TrainerProgress | None:
    """The current attempt's progress from rank 0's metrics; None when it cannot be read."""
    address = rank0_address(pods, attempt)
    return fetch(address, port) if address is not None else None
