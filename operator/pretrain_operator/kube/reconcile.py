"""One level-triggered pass over a PretrainJob: read, plan, apply, write status once.

``reconcile`` reads the job (the caller's copy) and its pods by label, asks the pure planner
what should run, makes the pods say so, and patches the status subresource only when it
changed, then posts the plan's events. Every write is idempotent (deterministic names, 409 on
create and 404 on delete are success), and the status is written after the objects, so running
it twice, or after the operator died half-way through, decides and creates nothing new.

A spec that slipped past the CRD schema gets ``Failed``/``InvalidSpec`` naming the fields, and
nothing else happens until the spec changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pretrain_trainer.config import SpecError

from ..api import Condition, ConditionType, JobStatus, Phase, PretrainJob, Reason, parse_job
from ..plan import Event, Plan, plan
from .client import KubeClient
from .objects import (
    ATTEMPT,
    ROLE,
    SLOT,
    WORKER,
    Options,
    attempt_name,
    config_map,
    job_objects,
    rendezvous_name,
    selector,
    standby_name,
    standby_pod,
    worker_name,
    worker_pod,
)
from .observe import observe, ready_nodes


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


def _label(pod: Mapping[str, Any], key: str) -> str | None:
    value = pod["metadata"].get("labels", {}).get(key)
    return value if isinstance(value, str) else None


def _dump(status: JobStatus) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True)


def invalid(body: Mapping[str, Any], error: SpecError, now: datetime) -> JobStatus:
    """The status of a job whose spec cannot be used: Failed, naming every bad field."""
    message = "; ".join(str(p) for p in error.problems)[:1024]
    previous = body.get("status") or {}
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == "Failed"), None)
    since = now
    if (
        old is not None
        and old.get("reason") == Reason.INVALID_SPEC
        and old.get("message") == (message)
    ):
        since = datetime.fromisoformat(old["lastTransitionTime"].replace("Z", "+00:00"))
    condition = Condition(
        type=ConditionType.FAILED,
        status="True",
        reason=Reason.INVALID_SPEC,
        message=message,
        last_transition_time=since,
    )
    return JobStatus(
        phase=Phase.FAILED,
        conditions=[condition],
        observed_generation=body["metadata"].get("generation"),
    )


def _current_status(body: Mapping[str, Any], job: PretrainJob) -> JobStatus:
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
) -> Outcome:
    """One pass. ``pods`` and ``readiness`` (node name -> Ready) come from the caller's watch
    cache when it has one; otherwise they are read from the API server."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        job = parse_job(body)
    except SpecError as error:
        status = invalid(body, error, now)
        said: tuple[Event, ...] = ()
        if (body.get("status") or {}) != _dump(status):
            client.patch_job_status(namespace, name, _dump(status))
            said = (Event(Reason.INVALID_SPEC, status.conditions[0].message, warning=True),)
            client.event(body, reason=said[0].reason, message=said[0].message, warning=True)
        return Outcome(status, said, None)
    old = _current_status(body, job)
    if pods is None:
        pods = list(client.list_pods(namespace, selector=selector(job)))
    if readiness is None:
        nodes = client.list_nodes()
        readiness = ready_nodes(nodes) if nodes is not None else _assume_ready(pods)
    stage = old.stage.index if old.stage is not None else 0
    observed = observe(
        pods,
        readiness,
        attempt=old.attempt,
        group_slots=old.workers.slots,
        slots=_useful_slots(job, stage),
    )
    result = plan(spec=job.spec, status=old, observed=observed, now=now)
    applied = apply(client, job, result, pods, nodes=readiness, options=options)
    status = result.status.model_copy(update={"observed_generation": job.metadata.generation})
    if status != job.status:
        client.patch_job_status(namespace, name, _dump(status))
    for event in result.events:
        client.event(body, reason=event.reason, message=event.message, warning=event.warning)
    return Outcome(status, result.events, result.requeue_after, applied)


def _assume_ready(pods: Sequence[Mapping[str, Any]]) -> dict[str, bool]:
    """Without the right to read nodes, trust the pods' own phase (the kubelet's word)."""
    return {p["spec"]["nodeName"]: True for p in pods if p.get("spec", {}).get("nodeName")}


def apply(
    client: KubeClient,
    job: PretrainJob,
    result: Plan,
    pods: Sequence[Mapping[str, Any]],
    *,
    nodes: Mapping[str, bool],
    options: Options | None = None,
) -> Applied:
    """Make the job's objects match the plan. Idempotent. ``nodes``: readiness by name."""
    namespace = job.metadata.namespace or "default"
    options = options or Options()
    by_name = {p["metadata"]["name"]: p for p in pods}
    phase = result.status.phase
    applied = Applied()

    def delete(pod: Mapping[str, Any], *, grace: int | None = None) -> None:
        if not pod["metadata"].get("deletionTimestamp"):
            name = pod["metadata"]["name"]
            if client.delete("Pod", name, namespace=namespace, grace_seconds=grace):
                applied.deleted.append(pod)

    def create(obj: dict[str, Any]) -> None:
        created = client.create(obj, namespace=namespace)
        if created is not None and obj["kind"] == "Pod":
            applied.created.append(created)

    if phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED):
        for pod in pods:  # everything goes; the checkpoints stay on their volume
            delete(pod)
        return applied

    rendezvous = by_name.get(rendezvous_name(job))
    if rendezvous is not None and _gone(rendezvous, nodes):
        delete(rendezvous, grace=0)  # the store is unreachable: a new one, same DNS name
        rendezvous = None
    if rendezvous is None:
        for obj in job_objects(job, options):
            create(obj)

    group = result.group
    stop = set(result.stop)
    for pod in pods:
        if _label(pod, ROLE) != WORKER:
            continue
        attempt = int(_label(pod, ATTEMPT) or -1)
        finished = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
        slot = int(_label(pod, SLOT) or -1)
        ours = group is not None and attempt == group.attempt
        if not ours and (slot in stop or finished or attempt < result.status.attempt):
            delete(pod)

    if group is not None and worker_name(job, group.attempt, group.slots[0]) not in by_name:
        # A new attempt: the run config may have changed with the spec, and a gang needs its
        # PodGroup before its pods.
        client.replace_or_create(config_map(job), namespace=namespace)
        pod_group = options.gang.pod_group(job, group)
        if pod_group is not None:
            create(pod_group)
            client.delete(
                "PodGroup",
                attempt_name(job, group.attempt - 1),
                namespace=namespace,
                api_version=pod_group["apiVersion"],
            )
    group_slots = set(group.slots) if group is not None else set()
    if group is not None:
        for slot in group.slots:
            if worker_name(job, group.attempt, slot) in by_name:
                continue
            create(worker_pod(job, group, slot, options=options))
            standby = by_name.get(standby_name(job, slot))
            if standby is not None:  # after the create: a pass that dies in between keeps it
                delete(standby, grace=0)  # its node is where this worker should run

    # Standbys probe for spare capacity. While a group's pods wait for the scheduler, an
    # unscheduled standby would compete with them for the nodes just freed: it goes, and comes
    # back once the whole group is placed.
    placing = group is not None and not all(
        _scheduled(by_name.get(worker_name(job, group.attempt, slot))) for slot in group.slots
    )
    busy = {
        int(_label(p, SLOT) or -1)
        for p in pods
        if _label(p, ROLE) == WORKER and p.get("status", {}).get("phase") in ("Pending", "Running")
    }
    stage = (
        result.group.stage
        if result.group is not None
        else (result.status.stage.index if result.status.stage is not None else 0)
    )
    for slot in range(_useful_slots(job, stage)):
        if slot in group_slots:
            continue
        standby = by_name.get(standby_name(job, slot))
        if standby is None:
            if not placing and slot not in busy:
                create(standby_pod(job, slot, priority_class=options.standby_priority_class))
        elif standby.get("status", {}).get("phase") in ("Failed", "Succeeded"):
            delete(standby)  # evicted or killed: ask again next time
        elif placing and not _scheduled(standby):
            delete(standby, grace=0)
    return applied


def _useful_slots(job: PretrainJob, stage: int) -> int:
    """Slots worth a pod: up to the largest group the stage can run at. A standby beyond it
    could never be used, and would only hold a node that others need."""
    usable = job.spec.worker_counts(job.spec.stages[stage]).usable
    return max(usable, default=job.spec.elastic.max_count)


def _gone(pod: Mapping[str, Any], nodes: Mapping[str, bool]) -> bool:
    """A pod that no longer runs and will not again: failed, or on a node that is down."""
    node = pod.get("spec", {}).get("nodeName")
    failed = pod.get("status", {}).get("phase") in ("Failed", "Succeeded")
    return failed or (node is not None and not nodes.get(node, False))


def _scheduled(pod: Mapping[str, Any] | None) -> bool:
    return pod is not None and bool(pod.get("spec", {}).get("nodeName"))
