"""One level-triggered pass over a PretrainJob: read, plan, apply, write status once.

``reconcile`` reads the job (the caller's copy) and its pods by label, asks the pure planner
what should run, turns that into actions (:mod:`.actions`, pure) and carries them out, reads
the trainer's progress when the caller asks for it, patches the status subresource once, only
when it changed, and then posts the plan's events. Every write is idempotent (deterministic
names; "already exists" on create and "not found" on delete are success), and the status is
written after the objects, so running it twice, or after the operator died half-way through,
decides and creates nothing new.

A spec that slipped past the CRD schema gets ``Failed``/``InvalidSpec`` naming the fields, and
nothing else happens until the spec changes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from pretrain_trainer.agent_client import AgentClient, AgentError
from pretrain_trainer.config import SpecError
from pydantic import ValidationError

from ..api import (
    ConditionType,
    JobStatus,
    Phase,
    PretrainJob,
    Reason,
    parse_job,
    set_condition,
)
from ..plan import Event, plan
from ..telemetry.accounting import accounted
from ..telemetry.progress import TrainerProgress, with_progress
from .actions import Action, Annotate, Create, Delete, Order, Replace, Stop, actions, useful_slots
from .agents import AgentReader, read_agents
from .client import KubeClient
from .objects import Options, selector
from .observe import observe, observe_agents, observe_export, ready_nodes

log = logging.getLogger(__name__)
ProgressReader = Callable[[Sequence[Mapping[str, Any]], int], TrainerProgress | None]
"""Reads the current attempt's progress from its pods (rank 0's metrics); None if unknown."""


# Pod writes of one pass in flight at once: a 1,024-worker group is 2,048 writes (its workers
# created, its standbys deleted), 30 s one at a time against a real API server. Below the
# client's connection pool (5 per CPU, at least 10 on 2 CPUs).
WRITES_IN_FLIGHT = 8


@dataclass(frozen=True)
class Applied:
    """The pods a pass created and deleted (for the watch cache's expectations)."""

    created: list[dict[str, Any]] = field(default_factory=list)
    deleted: list[Mapping[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    events: tuple[Event, ...]
    requeue_after: float | None
    applied: Applied = Applied()


def _dump(status: JobStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True)


def invalid(body: Mapping[str, Any], error: SpecError, now: datetime) -> JobStatus:
    """The status of a job whose spec cannot be used: Failed, naming every bad field."""
    message = "; ".join(str(p) for p in error.problems)[:1024]
    try:  # the status is ours, but a job refused for its spec must never crash the pass
        previous = JobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        previous = JobStatus()
    # Its transition time stays while the job stays refused for the same reasons.
    conditions = [
        c
        for c in previous.conditions
        if (c.type, c.reason, c.message) == (ConditionType.FAILED, Reason.INVALID_SPEC, message)
    ]
    conditions = set_condition(
        conditions, type_=ConditionType.FAILED, reason=Reason.INVALID_SPEC, message=message, now=now
    )
    return JobStatus(
        phase=Phase.FAILED,
        conditions=conditions,
        observed_generation=body["metadata"].get("generation"),
    )


def _current_status(job: PretrainJob) -> JobStatus:
    status = job.status
    failed = next((c for c in status.conditions if c.type == ConditionType.FAILED), None)
    if failed is not None and failed.reason == Reason.INVALID_SPEC:
        return JobStatus()  # the spec was fixed: start afresh
    return status


def reconcile(
    client: KubeClient,
    body: Mapping[str, Any],
    *,
    now: datetime,
    options: Options | None = None,
    pods: Sequence[Mapping[str, Any]] | None = None,
    readiness: Mapping[str, bool] | None = None,
    progress: ProgressReader | None = None,
    agents: AgentReader = read_agents,
    connect: Callable[[str], AgentClient] = AgentClient,
) -> Outcome:
    """One pass. ``pods`` and ``readiness`` (node name -> Ready) come from the caller's watch
    cache when it has one; otherwise they are read from the API server. ``progress``, when
    given, is asked for a running job's progress before the status is written. With
    ``options.agents``, ``agents`` reads the slot pods' agents and ``connect`` reaches one."""
    options = options or Options()
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        job = parse_job(body)
    except SpecError as error:
        return _refuse(client, body, invalid(body, error, now))
    old = _current_status(job)
    if pods is None:
        pods = list(client.list_pods(namespace, selector=selector(job)))
    if readiness is None:
        nodes = client.list_nodes()
        readiness = ready_nodes(nodes) if nodes is not None else _assume_ready(pods)
    stage = old.stage.index if old.stage is not None else 0
    slots, attempt, group = useful_slots(job, stage), old.attempt, old.workers.slots
    states = agents(pods) if options.agents else None
    if states is not None:
        observed = observe_agents(
            pods, readiness, states, attempt=attempt, group_slots=group, slots=slots
        )
    else:
        observed = observe(pods, readiness, attempt=attempt, group_slots=group, slots=slots)
    if old.export is not None:
        observed = replace(observed, export=observe_export(pods, readiness))
    result = plan(spec=job.spec, status=old, observed=observed, now=now)
    todo = actions(job, result, pods, nodes=readiness, options=options, agents=states)
    applied = apply(client, todo, namespace=job.metadata.namespace or "default", connect=connect)
    status = result.status.model_copy(update={"observed_generation": job.metadata.generation})
    usage = None
    if progress is not None and status.phase == Phase.RUNNING:
        read = progress(pods, status.attempt)
        if read is not None:
            status = with_progress(status, job.spec, read, now=now)
            usage = read.usage
    status = accounted(
        old, status, events=result.events, observed=observed, usage=usage, now=now.timestamp()
    )
    if status != job.status:  # the one status write of the pass
        client.patch_job_status(namespace, name, _dump(status))
    for event in result.events:
        client.event(body, reason=event.reason, message=event.message, warning=event.warning)
    return Outcome(status, result.events, result.requeue_after, applied)


def _refuse(client: KubeClient, body: Mapping[str, Any], status: JobStatus) -> Outcome:
    """Write the InvalidSpec status once (and say so in an event); do nothing else."""
    meta = body["metadata"]
    if (body.get("status") or {}) == _dump(status):
        return Outcome(status, (), None)
    client.patch_job_status(meta["namespace"], meta["name"], _dump(status))
    said = Event(Reason.INVALID_SPEC, status.conditions[0].message, warning=True)
    client.event(body, reason=said.reason, message=said.message, warning=True)
    return Outcome(status, (said,), None)


def _assume_ready(pods: Sequence[Mapping[str, Any]]) -> dict[str, bool]:
    """Without the right to read nodes, trust the pods' own phase (the kubelet's word)."""
    return {p["spec"]["nodeName"]: True for p in pods if p.get("spec", {}).get("nodeName")}


def _batch(action: Action) -> str | None:
    """Which run of independent requests an action may join: pod creates, or pod deletes."""
    if isinstance(action, Create) and action.obj["kind"] == "Pod":
        return "create"
    if isinstance(action, Delete) and action.kind == "Pod":
        return "delete"
    return None


def apply(
    client: KubeClient,
    todo: Sequence[Action],
    *,
    namespace: str,
    in_flight: int = WRITES_IN_FLIGHT,
    connect: Callable[[str], AgentClient] = AgentClient,
) -> Applied:
    """Carry out the actions in order. Idempotent: an object that already exists is not
    created again, one already gone is not an error. A run of consecutive pod creates (or pod
    deletes) is independent: up to ``in_flight`` of its requests go at once, and the run ends
    before anything after it starts; if any of them fails, the first error is raised once the
    run is over (the next pass does the rest)."""
    applied = Applied()
    runs = [list(run) for _, run in itertools.groupby(todo, key=lambda a: _batch(a) or id(a))]
    with ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="apply") as pool:
        for run in runs:
            if len(run) == 1:
                _do(client, run[0], namespace=namespace, applied=applied, connect=connect)
                continue
            done = [
                pool.submit(_do, client, a, namespace=namespace, applied=applied, connect=connect)
                for a in run
            ]
            errors = [e for e in (f.exception() for f in done) if e is not None]
            if errors:
                raise errors[0]
    return applied


def _do(
    client: KubeClient,
    action: Action,
    *,
    namespace: str,
    applied: Applied,
    connect: Callable[[str], AgentClient],
) -> None:
    if isinstance(action, Create):
        created = client.create(action.obj, namespace=namespace)
        if created is not None and action.obj["kind"] == "Pod":
            applied.created.append(created)
    elif isinstance(action, Replace):
        client.replace_or_create(action.obj, namespace=namespace)
    elif isinstance(action, Annotate):
        client.patch_pod_metadata(action.name, annotations=action.annotations, namespace=namespace)
    elif isinstance(action, Order):
        client.patch_pod_metadata(action.name, labels=action.labels, namespace=namespace)
        try:  # not answering: the next pass sees it waiting, and tells it again
            connect(action.address).run(action.order)
        except AgentError as error:
            log.warning("%s: %s", action.name, error)
    elif isinstance(action, Stop):
        try:
            connect(action.address).stop(action.attempt, grace=action.grace)
        except AgentError as error:
            log.warning("%s: %s", action.name, error)
    else:
        gone = client.delete(
            action.kind,
            action.name,
            namespace=namespace,
            api_version=action.api_version,
            grace_seconds=action.grace,
            uid=action.uid,
        )
        if gone and action.pod is not None:
            applied.deleted.append(action.pod)
