"""The control plane's Prometheus series (docs/design.md, "Observability"), for the operator
and the local runner alike.

Job series are derived at scrape time from each job's latest status (and, where the step
records are at hand, its goodput), so they survive an operator restart the way the status does:
a counter here is a count the status keeps. Labels stay bounded: namespace, job, and a closed
set of phases, reasons and worker states; never a step, a pod or an attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ..api import JobStatus, Phase
from .goodput import REASONS, Goodput

PREFIX = "pretrainjob_"
RECOVERY_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class JobSnapshot:
    namespace: str
    name: str
    status: JobStatus
    goodput: Goodput | None = None


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
        goodput = GaugeMetricFamily(
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
            if job.goodput is not None:
                goodput.add_metric(key, job.goodput.ratio)
                for reason in REASONS:
                    badput.add_metric([*key, reason], job.goodput.badput.get(reason, 0.0))
                seen = job.goodput.recoveries
                buckets = [
                    (str(b), float(sum(1 for s in seen if s <= b))) for b in RECOVERY_BUCKETS
                ]
                buckets.append(("+Inf", float(len(seen))))
                recovery.add_metric(key, buckets, sum_value=float(sum(seen)))
        yield from (phase, restarts, transitions, workers, stage, eta, goodput, badput, recovery)


class OperatorMetrics:
    """The control loop's own series, plus those of the jobs in ``jobs`` (kept up to date by
    the control loop; see :class:`JobsCollector`)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], JobSnapshot] = {}
        self.registry = CollectorRegistry()
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
