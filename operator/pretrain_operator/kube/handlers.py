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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from ..api import GROUP, PLURAL, VERSION, Phase
from ..telemetry.metrics import JobSnapshot, OperatorMetrics
from . import progress
from .cache import Expectations
from .client import ApiError, KubeClient, TemporaryApiError
from .objects import JOB
from .reconcile import reconcile
from .settings import OperatorSettings

FINALIZER = f"{GROUP}/finalizer"
RETRY_SECONDS = 5.0


def configure(settings: kopf.OperatorSettings, operator: OperatorSettings) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False  # our own events explain decisions; kopf's would be noise
    settings.peering.name = operator.peering
    settings.peering.mandatory = not operator.standalone
    settings.peering.standalone = operator.standalone
    settings.peering.clusterwide = not operator.namespaces
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330


def register(
    registry: kopf.OperatorRegistry,
    *,
    operator: OperatorSettings,
    make_client: Callable[[], KubeClient],
    metrics: OperatorMetrics | None = None,
) -> None:
    pokes: dict[tuple[str, str], asyncio.Event] = {}
    readiness: dict[str, bool] = {}
    options = operator.pod_options()
    progressed: dict[tuple[str, str], float] = {}  # when each job's progress was last read
    metrics = metrics or OperatorMetrics()

    def poke(namespace: str | None, name: str | None) -> None:
        event = pokes.get((namespace or "", name or ""))
        if event is not None:
            event.set()

    @kopf.on.startup(registry=registry)
    def startup(*, settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, operator)

    @kopf.index("", "v1", "pods", labels={JOB: kopf.PRESENT}, id="pods_by_job", registry=registry)
    def pods_by_job(
        *, namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
    ) -> dict[tuple[str, str], dict[str, Any]]:
        return {(namespace or "", labels[JOB]): copy.deepcopy(dict(body))}

    if operator.watch_nodes:

        @kopf.index("", "v1", "nodes", id="node_ready", registry=registry)
        def node_ready(*, name: str, body: kopf.Body, **_: Any) -> dict[str, bool]:
            conditions = body.get("status", {}).get("conditions") or []
            return {
                name: any(
                    c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
                )
            }

    def one_pass(
        client: KubeClient,
        namespace: str,
        name: str,
        expectations: Expectations,
        indexes: Mapping[str, Any],
    ) -> float | None:
        started = time.perf_counter()
        try:
            body = client.get_job(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            cached = indexes["pods_by_job"].get((namespace, name), [])
            pods = expectations.correct(cached, now=time.monotonic())
            nodes = indexes.get("node_ready")
            readiness = {n: next(iter(v)) for n, v in nodes.items()} if nodes is not None else None
            outcome = reconcile(
                client, body, now=datetime.now(UTC), options=options, pods=pods, readiness=readiness
            )
            expectations.record(
                created=outcome.applied.created,
                deleted=outcome.applied.deleted,
                now=time.monotonic(),
            )
            status = outcome.status
            if (
                time.monotonic() - progressed.get((namespace, name), 0.0)
                >= (operator.progress_seconds)
                and status.phase == Phase.RUNNING
            ):
                progressed[(namespace, name)] = time.monotonic()
                status = progress.refresh(
                    client, body, status, pods, port=operator.trainer_metrics_port
                )
            metrics.jobs[(namespace, name)] = JobSnapshot(namespace, name, status)
            return outcome.requeue_after
        finally:
            metrics.reconcile_seconds.observe(time.perf_counter() - started)

    @kopf.daemon(
        GROUP, VERSION, PLURAL, id="reconcile", registry=registry, cancellation_timeout=10.0
    )
    async def run_job(
        *, stopped: kopf.DaemonStopped, namespace: str | None, name: str, logger: Any, **kw: Any
    ) -> None:
        namespace = namespace or "default"
        wake = pokes.setdefault((namespace, name), asyncio.Event())
        client = make_client()
        expectations = Expectations()
        try:
            while not stopped:
                wake.clear()
                wait = operator.resync_seconds
                try:
                    requeue = await asyncio.to_thread(
                        one_pass, client, namespace, name, expectations, kw
                    )
                    if requeue is not None:
                        wait = min(max(requeue, 0.05), wait)
                except TemporaryApiError as error:
                    metrics.reconcile_errors.labels("temporary").inc()
                    logger.warning(f"reconcile will be retried: {error}")
                    wait = RETRY_SECONDS
                except ApiError as error:
                    metrics.reconcile_errors.labels("permanent").inc()
                    logger.error(f"reconcile failed: {error}")
                except Exception:  # never let one job take the operator down
                    metrics.reconcile_errors.labels("internal").inc()
                    logger.exception("reconcile failed")
                    wait = RETRY_SECONDS
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=wait)
        finally:
            pokes.pop((namespace, name), None)
            metrics.jobs.pop((namespace, name), None)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    def job_changed(*, namespace: str | None, name: str | None, **_: Any) -> None:
        poke(namespace, name)

    @kopf.on.event("", "v1", "pods", labels={JOB: kopf.PRESENT}, registry=registry)
    def pod_changed(*, namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        poke(namespace, labels.get(JOB))

    if operator.watch_nodes:

        @kopf.on.event("", "v1", "nodes", registry=registry)
        def node_changed(*, name: str | None, body: kopf.Body, **_: Any) -> None:
            conditions = body.get("status", {}).get("conditions") or []
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            if name is not None and readiness.get(name) != ready:
                readiness[name] = ready
                for event in pokes.values():
                    event.set()


def default_client() -> KubeClient:
    """In a pod: the service account; elsewhere: the kubeconfig."""
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    return KubeClient(kubernetes.client.ApiClient())


def run(operator: OperatorSettings) -> None:
    """``pretrainctl operator``: serve until stopped."""
    from prometheus_client import start_http_server

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    metrics = OperatorMetrics()
    register(registry, operator=operator, make_client=default_client, metrics=metrics)
    if operator.metrics_port:
        start_http_server(operator.metrics_port, registry=metrics.registry)
    kopf.run(
        registry=registry,
        clusterwide=not operator.namespaces,
        namespaces=operator.namespaces,
        standalone=operator.standalone,
        peering_name=operator.peering,
        liveness_endpoint=(
            f"http://0.0.0.0:{operator.health_port}/healthz" if operator.health_port else None
        ),
    )
