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

from ..telemetry.progress import TrainerProgress
from .objects import ATTEMPT, RANK, ROLE, WORKER

TIMEOUT = 2.0


def parse(text: str) -> TrainerProgress | None:
    """Progress from a trainer's Prometheus exposition; None before it has any."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = sample.value
    if "pretrainjob_step" not in values:
        return None
    count = values.get("pretrainjob_step_seconds_count", 0.0)
    loss = values.get("pretrainjob_loss")
    return TrainerProgress(
        stage=None,
        step=int(values["pretrainjob_step"]),
        tokens=int(values.get("pretrainjob_stage_tokens", 0.0)),
        loss=loss if loss is not None and loss == loss else None,  # NaN: no step yet
        seconds_per_step=values["pretrainjob_step_seconds_sum"] / count if count else None,
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
