"""kopf adapters: one daemon per PretrainJob that calls :func:`reconcile` whenever something
about the job may have changed, and at least every ``resync_seconds``.

Nothing here decides anything. The daemon re-reads the job each pass (a strongly consistent
read: kopf's live body can trail the status we just wrote); its pods and the nodes' readiness
come from kopf indexes fed by the watches (a watch cache, corrected by :mod:`.cache` for this
operator's own recent writes), so a steady pass costs one GET whatever the job's size. It
sleeps until the plan's requeue time, the resync interval, or a poke: an event on the job, on
one of its pods (found by the ``pretrain.dev/job`` label), or on a node whose readiness
changed. Pokes coalesce, so a burst of 1,000 pod events costs a handful of reconciles. Handler
results are never stored in status, and kopf's finalizer and annotations use the project's own
names.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import kopf

from ..api import GROUP, PLURAL, VERSION, Phase
from ..telemetry.metrics import JobSnapshot, OperatorMetrics
from ..telemetry.progress import TrainerProgress
from . import progress
from .agents import AgentCache, read_agents
from .cache import Expectations
from .client import ApiError, KubeClient, TemporaryApiError
from .objects import JOB
from .observe import node_ready
from .reconcile import ProgressReader, reconcile
from .settings import OperatorSettings

FINALIZER = f"{GROUP}/finalizer"
RETRY_SECONDS = 5.0
DONE = (Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED)


def configure(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """kopf's own settings (``settings``) from the operator's (``ours``)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # our own events explain decisions; kopf's would be noise
    settings.peering.name = ours.peering
    settings.peering.mandatory = not ours.standalone
    settings.peering.standalone = ours.standalone
    settings.peering.clusterwide = not ours.namespaces
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def pods_by_job(
    *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """The pod index (a watch cache): each job's pods under (namespace, job name)."""
    return {(namespace or "", labels[JOB]): copy.deepcopy(dict(body))}


def nodes_ready(*, name: str, body: kopf.Body, **_: Any) -> dict[str, bool]:
    """The node index: each node's readiness."""
    return {name: node_ready(body)}


class JobLoops:
    """The operator's per-job state: one reconcile loop per PretrainJob, woken by pokes, and
    when each job's progress was last read. Its methods are the kopf handlers."""

    def __init__(
        self,
        *,
        settings: OperatorSettings,
        make_client: Callable[[], KubeClient],
        metrics: OperatorMetrics,
    ) -> None:
        self.settings, self.make_client, self.metrics = settings, make_client, metrics
        self.options = settings.pod_options()
        self.wakes: dict[tuple[str, str], asyncio.Event] = {}
        self.readiness: dict[str, bool] = {}  # the last readiness seen, to poke on a change
        self.progressed: dict[tuple[str, str], float] = {}  # when progress was last read

    def poke(self, namespace: str | None, name: str | None) -> None:
        wake = self.wakes.get((namespace or "", name or ""))
        if wake is not None:
            wake.set()

    # -- handlers ----------------------------------------------------------------------------
    def startup(self, *, settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, self.settings)  # kopf's settings, from ours

    def job_changed(self, *, namespace: str | None, name: str | None, **_: Any) -> None:
        self.poke(namespace, name)

    def pod_changed(self, *, namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        self.poke(namespace, labels.get(JOB))

    def node_changed(self, *, name: str | None, body: kopf.Body, **_: Any) -> None:
        ready = node_ready(body)
        if name is not None and self.readiness.get(name) != ready:
            self.readiness[name] = ready
            for wake in self.wakes.values():
                wake.set()

    async def run_job(
        self,
        *,
        stopped: kopf.DaemonStopped,
        namespace: str | None,
        name: str,
        logger: kopf.Logger,
        **kw: Any,
    ) -> None:
        """The daemon of one job: a pass, then sleep until the requeue time, the resync
        interval or a poke, whichever comes first."""
        key = (namespace or "default", name)
        wake = self.wakes.setdefault(key, asyncio.Event())
        client = self.make_client()
        expectations = Expectations()
        agents = AgentCache(refresh_seconds=self.settings.agent_poll_seconds)
        try:
            while not stopped:
                wake.clear()
                wait = await self._pass_safely(
                    client, key, expectations=expectations, indexes=kw, logger=logger, agents=agents
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=wait)
        finally:
            self.wakes.pop(key, None)
            self.metrics.jobs.pop(key, None)

    # -- one pass ----------------------------------------------------------------------------
    async def _pass_safely(
        self,
        client: KubeClient,
        key: tuple[str, str],
        *,
        expectations: Expectations,
        indexes: Mapping[str, Any],
        logger: kopf.Logger,
        agents: AgentCache,
    ) -> float:
        """One pass in a thread; returns how long to sleep. Errors never end the loop."""
        wait = self.settings.resync_seconds
        try:
            requeue = await asyncio.to_thread(
                self.one_pass,
                client,
                key,
                expectations=expectations,
                indexes=indexes,
                agents=agents,
            )
            if requeue is not None:
                wait = min(max(requeue, 0.05), wait)
        except TemporaryApiError as error:
            self.metrics.reconcile_errors.labels("temporary").inc()
            logger.warning(f"reconcile will be retried: {error}")
            wait = RETRY_SECONDS
        except ApiError as error:
            self.metrics.reconcile_errors.labels("permanent").inc()
            logger.error(f"reconcile failed: {error}")
        except Exception:  # never let one job take the operator down
            self.metrics.reconcile_errors.labels("internal").inc()
            logger.exception("reconcile failed")
            wait = RETRY_SECONDS
        return wait

    def one_pass(
        self,
        client: KubeClient,
        key: tuple[str, str],
        *,
        expectations: Expectations,
        indexes: Mapping[str, Any],
        agents: AgentCache | None = None,
    ) -> float | None:
        started = time.perf_counter()
        try:
            body = client.get_job(*key)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            cached = indexes["pods_by_job"].get(key, [])
            pods = expectations.correct(cached, now=time.monotonic())
            nodes = indexes.get("nodes_ready")
            readiness = {n: next(iter(v)) for n, v in nodes.items()} if nodes is not None else None
            outcome = reconcile(
                client,
                body,
                now=datetime.now(UTC),
                options=self.options,
                pods=pods,
                readiness=readiness,
                progress=self._progress_reader(key),
                agents=agents or read_agents,
            )
            applied = outcome.applied
            now = time.monotonic()
            expectations.record(created=applied.created, deleted=applied.deleted, now=now)
            self.metrics.jobs[key] = JobSnapshot(*key, outcome.status)
            if self.options.agents and outcome.status.phase not in DONE:
                # The safety net under the pods' readiness (AgentCache reads every agent).
                poll = self.settings.agent_poll_seconds
                return min(outcome.requeue_after or poll, poll)
            return outcome.requeue_after
        finally:
            self.metrics.reconcile_seconds.observe(time.perf_counter() - started)

    def _progress_reader(self, key: tuple[str, str]) -> ProgressReader | None:
        """Rank 0's progress, at most every ``progress_seconds`` per job."""
        if time.monotonic() - self.progressed.get(key, 0.0) < self.settings.progress_seconds:
            return None

        def read(pods: Sequence[Mapping[str, Any]], attempt: int) -> TrainerProgress | None:
            self.progressed[key] = time.monotonic()
            return progress.read(pods, attempt, port=self.settings.trainer_metrics_port)

        return read


def register(
    registry: kopf.OperatorRegistry,
    *,
    settings: OperatorSettings,
    make_client: Callable[[], KubeClient],
    metrics: OperatorMetrics | None = None,
) -> JobLoops:
    """Register the operator's handlers in ``registry``; returns their shared state."""
    loops = JobLoops(
        settings=settings, make_client=make_client, metrics=metrics or OperatorMetrics()
    )
    kopf.on.startup(registry=registry)(loops.startup)
    labelled = {JOB: kopf.PRESENT}
    kopf.index("", "v1", "pods", id="pods_by_job", labels=labelled, registry=registry)(pods_by_job)
    kopf.on.event("", "v1", "pods", id="pod_changed", labels=labelled, registry=registry)(
        loops.pod_changed
    )
    kopf.on.event(GROUP, VERSION, PLURAL, id="job_changed", registry=registry)(loops.job_changed)
    reconciling = kopf.daemon(
        GROUP, VERSION, PLURAL, id="reconcile", registry=registry, cancellation_timeout=10.0
    )
    reconciling(loops.run_job)
    if settings.watch_nodes:
        kopf.index("", "v1", "nodes", id="nodes_ready", registry=registry)(nodes_ready)
        kopf.on.event("", "v1", "nodes", id="node_changed", registry=registry)(loops.node_changed)
    return loops


def default_client() -> KubeClient:
    """In a pod: the service account; elsewhere: the kubeconfig."""
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return KubeClient(kubernetes.client.ApiClient())


def run(settings: OperatorSettings) -> None:
    """``pretrainctl operator``: serve until stopped."""
    from prometheus_client import start_http_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    metrics = OperatorMetrics(budgets=settings.recovery_budgets)
    register(registry, settings=settings, make_client=default_client, metrics=metrics)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.registry)
    kopf.run(
        registry=registry,
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        standalone=settings.standalone,
        peering_name=settings.peering,
        liveness_endpoint=(
            f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None
        ),
    )
