"""A running job's progress for its status (step, tokens, loss, the stage's ETA), read from the
trainer's own ``/metrics`` on the worker that hosts rank 0, at a bounded rate.

The status is not a metrics store: it is updated every ``progress_seconds`` at most (30 s by
default), so ``kubectl get ptj`` shows where a job is without rewriting the object at every
step. A worker that does not answer within two seconds costs nothing but a stale column.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pretrain_trainer.config import SpecError
from prometheus_client.parser import text_string_to_metric_families

from ..api import JobStatus, parse_job
from ..telemetry.progress import TrainerProgress, with_progress
from .client import KubeClient
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


def refresh(
    client: KubeClient,
    body: Mapping[str, Any],
    status: JobStatus,
    pods: Sequence[Mapping[str, Any]],
    *,
    port: int,
) -> JobStatus:
    """Read rank 0's progress and write it into the job's status (only when it moved)."""
    address = rank0_address(pods, status.attempt)
    read = fetch(address, port) if address is not None else None
    if read is None:
        return status
    try:
        spec = parse_job(body).spec
    except SpecError:
        return status
    updated = with_progress(status, spec, read, now=datetime.now(UTC))
    if updated != status:
        meta = body["metadata"]
        fields = updated.model_dump(
            mode="json", by_alias=True, include={"step", "tokens", "loss", "eta"}
        )
        client.patch_job_status(meta["namespace"], meta["name"], fields)
    return updated
