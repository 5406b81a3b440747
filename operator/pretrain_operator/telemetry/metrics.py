"""The control plane's Prometheus series (docs/design.md, "Observability"), for the operator
and the local runner alike.

Job series are derived at scrape time from each job's latest status (its goodput ledger and
recovery histograms included), so they survive an operator restart the way the status does:
a counter here is a count the status keeps. Labels stay bounded: namespace, job, and a closed
set of phases, reasons and worker states; never a step, a pod or an attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..api import JobStatus, Phase, RecoveryHistory
from .goodput import REASONS, goodput
from .recovery import BUCKETS, DEFAULT_BUDGETS, PHASES, TOTAL

PREFIX = "pretrainjob_"
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class JobSnapshot:
    namespace: str
    name: str
    status: JobStatus


class JobsCollector(Collector):
    """Series for every job ``snapshots()`` returns at scrape time."""

    def __init__(self, snapshots: Callable[[], Iterable[JobSnapshot]]) -> None:
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        labels = ["namespace", "job"]
        phase = GaugeMetricFamily(
            PREFIX + "phase", "1 for the job's current phase, else 0.", labels=[*labels, "phase"]
        )
        restarts = CounterMetricFamily(
            PREFIX + "restarts",
            "Group restarts, by reason (resizes included).",
            labels=[*labels, "reason"],
        )
        transitions = CounterMetricFamily(
            PREFIX + "stage_transitions", "Stages the job has finished.", labels=labels
        )
        workers = GaugeMetricFamily(
            PREFIX + "workers",
            "Workers of the current attempt: desired and ready.",
            labels=[*labels, "state"],
        )
        stage = GaugeMetricFamily(
            PREFIX + "stage_index", "Index of the current stage.", labels=labels
        )
        eta = GaugeMetricFamily(
            PREFIX + "stage_eta_seconds",
            "Estimated seconds until the current stage ends.",
            labels=labels,
        )
        goodput_ratio = GaugeMetricFamily(
            PREFIX + "goodput_ratio",
            "Productive training time / wall time since the job started (suspensions excluded).",
            labels=labels,
        )
        badput = CounterMetricFamily(
            PREFIX + "badput_seconds",
            "Wall time lost to something other than training, by reason.",
            labels=[*labels, "reason"],
        )
        recovery = HistogramMetricFamily(
            PREFIX + "recovery_seconds",
            "From a worker loss to the first training step of the attempt that followed.",
            labels=labels,
        )
        recovery_phases = HistogramMetricFamily(
            PREFIX + "recovery_phase_seconds",
            "Each recovery's phases: detect, backoff, schedule, start, rendezvous, init, "
            "restore, first_step.",
            labels=[*labels, "phase"],
        )
        last_recovery = GaugeMetricFamily(
            PREFIX + "last_recovery_phase_seconds",
            "The last recovery's phases (status.lastRecovery), for budgets and stacked panels.",
            labels=[*labels, "phase"],
        )
        recovered = GaugeMetricFamily(
            PREFIX + "last_recovery_timestamp_seconds",
            "When the last recovery ended (its first step), Unix time.",
            labels=labels,
        )
        checkpoint_age = GaugeMetricFamily(
            PREFIX + "newest_checkpoint_age_seconds",
            "Seconds since the newest durable checkpoint (status.lastCheckpoint): the work a "
            "preemption would lose.",
            labels=labels,
        )
        checkpoint_step = GaugeMetricFamily(
            PREFIX + "newest_checkpoint_step",
            "Step of the newest durable checkpoint, in its stage (status.lastCheckpoint).",
            labels=labels,
        )
        now = datetime.now(UTC)
        for job in self.snapshots():
            key = [job.namespace, job.name]
            status = job.status
            for p in Phase:
                phase.add_metric([*key, p.value], 1.0 if status.phase == p else 0.0)
            for reason, count in sorted(status.restarts.by_reason.items()):
                restarts.add_metric([*key, reason], float(count))
            finished = sum(1 for s in status.stages if s.finished_at is not None)
            transitions.add_metric(key, float(finished))
            workers.add_metric([*key, "desired"], float(status.workers.desired))
            workers.add_metric([*key, "ready"], float(status.workers.ready))
            if status.stage is not None:
                stage.add_metric(key, float(status.stage.index))
            if status.eta is not None and status.phase == Phase.RUNNING:
                eta.add_metric(key, max((status.eta - now).total_seconds(), 0.0))
            figures = goodput(status, now=now.timestamp())
            if figures is not None:
                goodput_ratio.add_metric(key, figures.ratio)
                for reason in REASONS:
                    badput.add_metric([*key, reason], figures.badput.get(reason, 0.0))
            history = status.recoveries
            _histogram(recovery, key, history, TOTAL)
            for name in PHASES:
                _histogram(recovery_phases, [*key, name], history, name)
            last = status.last_recovery
            if last is not None:
                for name, seconds in last.phases.model_dump().items():
                    last_recovery.add_metric([*key, name], seconds)
                recovered.add_metric(key, last.lost_at.timestamp() + last.total_seconds)
            newest = status.last_checkpoint
            if newest is not None:
                checkpoint_step.add_metric(key, float(newest.step))
                if newest.saved_at is not None:
                    age = (now - newest.saved_at).total_seconds()
                    checkpoint_age.add_metric(key, max(age, 0.0))
        yield from (phase, restarts, transitions, workers, stage, eta, goodput_ratio, badput)
        yield from (recovery, recovery_phases, last_recovery, recovered)
        yield from (checkpoint_age, checkpoint_step)


def _histogram(
    family: HistogramMetricFamily, labels: list[str], history: RecoveryHistory, key: str
) -> None:
    """One series of ``family`` from the status' cumulative buckets of ``key``."""
    counts = history.buckets.get(key) or [0] * len(BUCKETS)
    buckets = [(str(b), float(c)) for b, c in zip(BUCKETS, counts, strict=True)]
    buckets.append(("+Inf", float(history.count)))
    family.add_metric(labels, buckets, sum_value=history.sums.get(key, 0.0))


class OperatorMetrics:
    """The control loop's own series, plus those of the jobs in ``jobs`` (kept up to date by
    the control loop; see :class:`JobsCollector`)."""

    def __init__(self, *, budgets: Mapping[str, float] = DEFAULT_BUDGETS) -> None:
        self.jobs: dict[tuple[str, str], JobSnapshot] = {}
        self.registry = CollectorRegistry()
        budget = Gauge(
            PREFIX + "recovery_phase_budget_seconds",
            "Seconds each recovery phase may take (the chart's recoveryBudgets).",
            ["phase"],
            registry=self.registry,
        )
        for phase, seconds in {**DEFAULT_BUDGETS, **budgets}.items():
            budget.labels(phase).set(seconds)
        self.reconcile_seconds = Histogram(
            PREFIX + "reconcile_seconds",
            "Time of one reconcile of a job (read, plan, apply, status).",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            PREFIX + "reconcile_errors",
            "Reconciles that failed, by kind (temporary API errors are retried).",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("temporary", "permanent", "internal"):  # every series exists from the start
            self.reconcile_errors.labels(kind)
        self.registry.register(JobsCollector(lambda: list(self.jobs.values())))
