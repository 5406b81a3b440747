"""Operator settings, read once from the environment at start and passed down (never imported
as globals). A bad value stops the operator at start with the variable's name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Literal

from pretrain_trainer.contract import DEFAULT_METRICS_PORT
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from ..telemetry.recovery import PHASES
from .objects import Gang, Options

PREFIX = "PRETRAIN_OPERATOR_"


class SettingsError(ValueError):
    pass


def _comma_separated(value: object) -> object:
    """``a, b`` as the environment spells a list."""
    if isinstance(value, str):
        return tuple(n.strip() for n in value.split(",") if n.strip())
    return value


def _pairs(value: object) -> object:
    """``detect=60, restore=180`` as the environment spells a mapping."""
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("expected name=seconds pairs, separated by commas")
        return {k.strip(): v.strip() for k, v in pairs}
    return value


def _known_phases(value: dict[str, float]) -> dict[str, float]:
    unknown = sorted(set(value) - set(PHASES))
    if unknown:
        raise ValueError(f"unknown recovery phase(s) {unknown}; known: {', '.join(PHASES)}")
    return value


class OperatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    namespaces: Annotated[tuple[str, ...], BeforeValidator(_comma_separated)] = ()
    """Namespaces to serve; empty serves the whole cluster."""
    resync_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """Longest time between two reconciles of a job when nothing happens."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 8080
    """Port of the operator's Prometheus metrics (0: none)."""
    health_port: Annotated[int, Field(ge=0, le=65535)] = 8081
    """Port of the liveness endpoint /healthz (0: none)."""
    peering: str = "pretrain-operator"
    """kopf peering object: of several replicas, only the one with the highest priority acts."""
    standalone: bool = False
    """Run without peering (one replica only; tests and development)."""
    gang_scheduler: Literal["none", "volcano", "coscheduling"] = "none"
    """Create a PodGroup per attempt for this gang scheduler."""
    standby_priority_class: str | None = None
    """PriorityClass of standby pods: lower than every workload's, so they yield their nodes."""
    trainer_metrics_port: Annotated[int, Field(ge=1, le=65535)] = DEFAULT_METRICS_PORT
    """Port of the trainers' /metrics and /healthz in worker pods (read for status progress)."""
    progress_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    """Least time between two progress updates (step, tokens, loss, ETA) of a job's status."""
    worker_agents: bool = True
    """Worker pods run the worker agent and outlive attempts: a restart, a resize or a new
    stage reaches the surviving pods as an order, and restores from their memory tier. Off:
    a pod per attempt running torchrun (where the operator cannot reach pods on port 9401)."""
    agent_poll_seconds: Annotated[float, Field(gt=0, le=300)] = 15.0
    """With worker agents: longest time between two reads of a job's agents. A trainer's end
    is seen sooner: its pod turns not ready (the readiness probe, every 2 s), an event the
    operator watches; this is the safety net."""
    watch_nodes: bool = True
    """Watch nodes so a NotReady node's workers count as lost at once (needs read on nodes)."""
    recovery_budgets: Annotated[
        dict[str, Annotated[float, Field(gt=0)]],
        BeforeValidator(_pairs),
        AfterValidator(_known_phases),
    ] = {}
    """Seconds each recovery phase may take (over it, an alert fires); unnamed phases keep
    their defaults (``telemetry.recovery.DEFAULT_BUDGETS``)."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> OperatorSettings:
        raw: dict[str, object] = {}
        for name in cls.model_fields:
            value = environ.get(PREFIX + name.upper())
            if value is None or value == "":
                continue
            raw[name] = value
        try:
            return cls.model_validate(raw)
        except ValidationError as error:
            problems = "; ".join(
                f"{PREFIX}{str(e['loc'][0]).upper()}: {e['msg']}" for e in error.errors()
            )
            raise SettingsError(problems) from None

    def pod_options(self) -> Options:
        gang = Gang(None if self.gang_scheduler == "none" else self.gang_scheduler)
        return Options(
            gang=gang,
            standby_priority_class=self.standby_priority_class,
            metrics_port=self.trainer_metrics_port,
            agents=self.worker_agents,
        )
