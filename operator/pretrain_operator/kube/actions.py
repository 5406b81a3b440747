"""What a pass must do to a job's objects so they say what the plan says. Pure.

:func:`actions` turns a :class:`~pretrain_operator.plan.Plan`, the job's pods and the nodes'
readiness into an ordered list of :class:`Create`, :class:`Replace`, :class:`Annotate` and
:class:`Delete` actions; ``reconcile.apply`` carries them out one by one and decides nothing.
The policies that are not the planner's (it knows slots, not pods) live here, where they are
tested as data:

- terminal phases (Succeeded, Failed, Suspended) delete every pod; checkpoints stay on their
  volume;
- while the model is exported (spec.export, after the last stage) only the export's pod of
  the current try runs: it is created, every other pod goes but earlier tries that ended;
- the rendezvous pod is replaced when it failed or its node is down (same DNS name, a new
  store); the job's other objects are created with it;
- a worker pod of an older attempt goes when its slot must stop, it finished, or its attempt
  is behind the status;
- a new attempt first rewrites the run config (the spec may have changed) and, for a gang
  scheduler, creates its PodGroup (and deletes the previous attempt's);
- a worker's standby goes *after* the worker is created: a pass that dies in between keeps it;
- the current attempt's workers carry the newest durable checkpoint's time and step as
  annotations (``pretrain.dev/last-checkpoint-time``, ``-step``), so a scheduler choosing
  victims can prefer the pods whose loss costs the least work;
- standbys probe for spare capacity on every slot the stage can use and no worker holds. While
  the group's pods wait for the scheduler, an unscheduled standby would compete with them for
  the nodes just freed: it goes, and comes back once the whole group is placed. A standby that
  was evicted or killed goes, to ask again next time.

When worker pods run agents (``Options.agents``), a slot's pod outlives attempts and the
group reaches it by :class:`Order` (labels first, then ``PUT /attempt`` to its agent); a slot
that must stop gets :class:`Stop` (its agent signals the trainers; the pod stays, warm). A
slot pod goes only when it is gone (finished, or its node is down), or it is idle on a slot no
group of the stage can use. A new attempt in a running pod waits for the old one to leave.
A gang scheduler's PodGroup belongs to the attempt whose pods it admitted.

Order matters and is kept: the apply loop performs the actions in the order given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from pretrain_trainer.contract import AGENT_PORT, AgentState, AttemptOrder

from ..api import JobStatus, Phase, PretrainJob
from ..plan import ExportTask, Group, Plan
from .cache import DELETING
from .objects import (
    ALIVE,
    ATTEMPT,
    EXPORT,
    FINISHED,
    PREFIX,
    ROLE,
    SLOT,
    WORKER,
    Options,
    PodPhase,
    agent_pod,
    attempt_name,
    config_map,
    export_name,
    export_pod,
    group_labels,
    job_objects,
    rendezvous_name,
    slot_pod_name,
    standby_name,
    standby_pod,
    worker_name,
    worker_pod,
)


@dataclass(frozen=True)
class Create:
    """Create an object; one that already exists is left as it is."""

    obj: dict[str, Any]


@dataclass(frozen=True)
class Replace:
    """Make a small, whole object read as ``obj`` (or create it)."""

    obj: dict[str, Any]


@dataclass(frozen=True)
class Annotate:
    """Set a pod's annotations (a merge patch of those named; the others stay)."""

    name: str
    annotations: dict[str, str]


@dataclass(frozen=True)
class Delete:
    """Delete an object; one already gone is fine."""

    kind: str
    name: str
    grace: int | None = None
    api_version: str = "v1"
    uid: str | None = None
    """Delete only the object with this uid (the one that was seen)."""
    pod: Mapping[str, Any] | None = None
    """The pod as last seen, for the watch cache's expectations."""


@dataclass(frozen=True)
class Order:
    """Tell a slot pod's agent to run its share of an attempt, after relabelling the pod with
    the attempt, stage and rank (so a label selector finds the attempt's workers)."""

    name: str
    address: str
    order: AttemptOrder
    labels: dict[str, str]


@dataclass(frozen=True)
class Stop:
    """Ask a slot pod's agent to stop an attempt (SIGTERM; SIGKILL after ``grace``)."""

    name: str
    address: str
    attempt: int
    grace: float


Action = Create | Replace | Annotate | Delete | Order | Stop
CHECKPOINT_TIME = f"{PREFIX}/last-checkpoint-time"
CHECKPOINT_STEP = f"{PREFIX}/last-checkpoint-step"


def _label(pod: Mapping[str, Any], key: str) -> str | None:
    value = pod["metadata"].get("labels", {}).get(key)
    return value if isinstance(value, str) else None


def _scheduled(pod: Mapping[str, Any] | None) -> bool:
    return pod is not None and bool(pod.get("spec", {}).get("nodeName"))


def _node_down(pod: Mapping[str, Any], nodes: Mapping[str, bool]) -> bool:
    node = pod.get("spec", {}).get("nodeName")
    return node is not None and not nodes.get(node, False)


def _gone(pod: Mapping[str, Any], nodes: Mapping[str, bool]) -> bool:
    """A pod that no longer runs and will not again: finished, or on a node that is down."""
    return PodPhase.of(pod) in FINISHED or _node_down(pod, nodes)


def _delete(
    pod: Mapping[str, Any], nodes: Mapping[str, bool], *, grace: int | None = None
) -> list[Action]:
    """Delete a pod, at once (grace 0) when its node is down: no kubelet is left there to
    confirm a graceful deletion, so the pod would stay Terminating, holding its name, until
    the node came back. A pod already being deleted is left alone, unless that deletion waits
    on such a node. The delete names the pod's uid, so it never removes a newer pod of the
    same name (a cache that trails may still show the old one)."""
    down = _node_down(pod, nodes)
    metadata = pod["metadata"]
    deleting = metadata.get("deletionTimestamp")
    if deleting and (not down or deleting == DELETING):
        return []
    grace = 0 if down else grace
    return [Delete("Pod", metadata["name"], grace=grace, uid=metadata.get("uid"), pod=pod)]


def useful_slots(job: PretrainJob, stage: int) -> int:
    """Slots worth a pod: up to the largest group the stage ever runs, the fewest workers as
    fast as its most (``WorkerCounts.best``). A standby beyond it could never make a step
    faster, and would only hold a node that others need."""
    counts = job.spec.worker_counts(job.spec.stages[stage])
    largest = counts.best(counts.high)
    return job.spec.elastic.max_count if largest is None else largest


def actions(
    job: PretrainJob,
    result: Plan,
    pods: Sequence[Mapping[str, Any]],
    *,
    nodes: Mapping[str, bool],
    options: Options,
    agents: Mapping[str, AgentState | None] | None = None,
) -> list[Action]:
    """The ordered actions that make the job's objects match ``result``. ``nodes``: node name
    -> Ready; ``agents`` (with ``options.agents``): slot pod name -> its agent's state."""
    if result.status.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED):
        return [a for pod in pods for a in _delete(pod, nodes)]
    if result.export is not None:
        return _export(job, result.export, pods, nodes=nodes)
    by_name = {p["metadata"]["name"]: p for p in pods}
    placing = _placing(job, result.group, by_name, options=options)
    standbys = _standbys(
        job, result, pods, by_name=by_name, nodes=nodes, options=options, placing=placing
    )
    if options.agents:
        return [
            *_rendezvous(job, by_name, nodes=nodes, options=options),
            *_slot_pods(job, result, pods, agents or {}, nodes=nodes, placing=placing),
            *_ordered(job, result, by_name, agents or {}, nodes=nodes, options=options),
            *standbys,
            *_checkpoint_annotations(result, pods),
        ]
    return [
        *_rendezvous(job, by_name, nodes=nodes, options=options),
        *_stale_workers(result, pods, nodes=nodes),
        *_group(job, result.group, by_name, nodes=nodes, options=options),
        *standbys,
        *_checkpoint_annotations(result, pods),
    ]


def _export(
    job: PretrainJob,
    task: ExportTask,
    pods: Sequence[Mapping[str, Any]],
    *,
    nodes: Mapping[str, bool],
) -> list[Action]:
    """The export's try runs, alone: the workers, standbys and store go (training is over),
    an older try that still runs goes, one that ended stays for its logs until the job ends."""
    name = export_name(job, task.attempt)
    found: list[Action] = []
    for pod in pods:
        if pod["metadata"]["name"] == name:
            continue
        if _label(pod, ROLE) != EXPORT or PodPhase.of(pod) not in FINISHED:
            found += _delete(pod, nodes)
    if not any(pod["metadata"]["name"] == name for pod in pods):
        found.append(Create(export_pod(job, task)))
    return found


def checkpoint_annotations(status: JobStatus) -> dict[str, str]:
    """What the current attempt's workers say of the newest durable checkpoint."""
    newest = status.last_checkpoint
    if newest is None or newest.saved_at is None:
        return {}
    saved = newest.saved_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {CHECKPOINT_TIME: saved, CHECKPOINT_STEP: f"{newest.stage}/{newest.step}"}


def _checkpoint_annotations(result: Plan, pods: Sequence[Mapping[str, Any]]) -> list[Action]:
    wanted = checkpoint_annotations(result.status)
    if not wanted or result.group is None:
        return []
    found: list[Action] = []
    for pod in pods:
        metadata = pod["metadata"]
        if _label(pod, ROLE) != WORKER or _label(pod, ATTEMPT) != str(result.group.attempt):
            continue
        if PodPhase.of(pod) != PodPhase.RUNNING or metadata.get("deletionTimestamp"):
            continue
        have = metadata.get("annotations") or {}
        if any(have.get(k) != v for k, v in wanted.items()):
            found.append(Annotate(metadata["name"], wanted))
    return found


def _rendezvous(
    job: PretrainJob,
    by_name: Mapping[str, Mapping[str, Any]],
    *,
    nodes: Mapping[str, bool],
    options: Options,
) -> list[Action]:
    rendezvous = by_name.get(rendezvous_name(job))
    if rendezvous is not None and not _gone(rendezvous, nodes):
        return []
    # The store is unreachable (or was never created): a new one under the same DNS name.
    gone = _delete(rendezvous, nodes, grace=0) if rendezvous is not None else []
    return [*gone, *(Create(obj) for obj in job_objects(job, options))]


def _stale_workers(
    result: Plan, pods: Sequence[Mapping[str, Any]], *, nodes: Mapping[str, bool]
) -> list[Action]:
    group, stop = result.group, set(result.stop)
    stale: list[Action] = []
    for pod in pods:
        if _label(pod, ROLE) != WORKER:
            continue
        attempt = int(_label(pod, ATTEMPT) or -1)
        slot = int(_label(pod, SLOT) or -1)
        ours = group is not None and attempt == group.attempt
        behind = attempt < result.status.attempt
        if not ours and (slot in stop or _gone(pod, nodes) or behind):
            stale += _delete(pod, nodes)
    return stale


def _group(
    job: PretrainJob,
    group: Group | None,
    by_name: Mapping[str, Mapping[str, Any]],
    *,
    nodes: Mapping[str, bool],
    options: Options,
) -> list[Action]:
    if group is None:
        return []
    found: list[Action] = []
    if worker_name(job, group.attempt, group.slots[0]) not in by_name:
        # A new attempt: the run config may have changed with the spec, and a gang needs its
        # PodGroup before its pods.
        found.append(Replace(config_map(job)))
        pod_group = options.gang.pod_group(job, group)
        if pod_group is not None:
            previous = attempt_name(job, group.attempt - 1)
            found.append(Create(pod_group))
            found.append(Delete("PodGroup", previous, api_version=pod_group["apiVersion"]))
    yielding: list[Action] = []
    for slot in group.slots:
        if worker_name(job, group.attempt, slot) not in by_name:
            found.append(Create(worker_pod(job, group, slot, options=options)))
        standby = by_name.get(standby_name(job, slot))
        if standby is not None:  # its node is where this group's worker should run
            yielding += _delete(standby, nodes, grace=0)
    # After every create: a pass that dies in between keeps them (the creates go at once),
    # and the next one, finding some workers there, still lets the group's standbys go.
    return found + yielding


def _stage(result: Plan) -> int:
    """The stage the plan is in: its group's, else the status's."""
    if result.group is not None:
        return result.group.stage
    return result.status.stage.index if result.status.stage is not None else 0


def _placing(
    job: PretrainJob,
    group: Group | None,
    by_name: Mapping[str, Mapping[str, Any]],
    *,
    options: Options,
) -> bool:
    """Whether some pod of the group has no node yet."""
    if group is None:
        return False

    def name(slot: int) -> str:
        return slot_pod_name(job, slot) if options.agents else worker_name(job, group.attempt, slot)

    return not all(_scheduled(by_name.get(name(slot))) for slot in group.slots)


def _standbys(
    job: PretrainJob,
    result: Plan,
    pods: Sequence[Mapping[str, Any]],
    *,
    by_name: Mapping[str, Mapping[str, Any]],
    nodes: Mapping[str, bool],
    options: Options,
    placing: bool,
) -> list[Action]:
    """Standbys on the useful slots no worker holds; ``placing``: the group has pods without
    a node yet, which unplaced standbys would compete with."""
    group = result.group
    busy = {  # a worker on a node that is down holds nothing the slot could use
        int(_label(p, SLOT) or -1)
        for p in pods
        if _label(p, ROLE) == WORKER and PodPhase.of(p) in ALIVE and not _node_down(p, nodes)
    }
    found: list[Action] = []
    for slot in range(useful_slots(job, _stage(result))):
        if group is not None and slot in group.slots:
            continue
        standby = by_name.get(standby_name(job, slot))
        if standby is None:
            if not placing and slot not in busy:
                priority = options.standby_priority_class
                found.append(Create(standby_pod(job, slot, priority_class=priority)))
        elif _gone(standby, nodes):
            found += _delete(standby, nodes)  # evicted, killed or lost: ask again next time
        elif placing and not _scheduled(standby):
            found += _delete(standby, nodes, grace=0)
    return found


# -- worker pods that run agents ---------------------------------------------------------------
def agent_address(pod: Mapping[str, Any]) -> str | None:
    """Where a slot pod's agent listens, once the pod has an address."""
    ip = pod.get("status", {}).get("podIP")
    return f"{ip}:{AGENT_PORT}" if ip else None


def _slot_pods(
    job: PretrainJob,
    result: Plan,
    pods: Sequence[Mapping[str, Any]],
    agents: Mapping[str, AgentState | None],
    *,
    nodes: Mapping[str, bool],
    placing: bool,
) -> list[Action]:
    """Slot pods that must stop their attempt, or go (``placing``: see :func:`_standbys`)."""
    group, stop = result.group, set(result.stop)
    useful = useful_slots(job, _stage(result))
    found: list[Action] = []
    for pod in pods:
        if _label(pod, ROLE) != WORKER:
            continue
        slot = int(_label(pod, SLOT) or -1)
        state, address = agents.get(pod["metadata"]["name"]), agent_address(pod)
        ours = group is not None and slot in group.slots
        if _gone(pod, nodes):
            found += _delete(pod, nodes)
        elif placing and not ours and not _scheduled(pod):
            found += _delete(pod, nodes, grace=0)  # it would compete for the group's nodes
        elif state is None or address is None or ours:
            continue  # not answering yet, or the group's (see _ordered)
        elif state.running and state.attempt is not None:
            if slot in stop or state.attempt < result.status.attempt:
                found.append(Stop(pod["metadata"]["name"], address, state.attempt, STOP_GRACE))
        elif slot >= useful:
            found += _delete(pod, nodes)  # idle where no group of the stage can use it
    return found


STOP_GRACE = 60.0  # seconds a stopped trainer has to save before its agent kills it


def _ordered(
    job: PretrainJob,
    result: Plan,
    by_name: Mapping[str, Mapping[str, Any]],
    agents: Mapping[str, AgentState | None],
    *,
    nodes: Mapping[str, bool],
    options: Options,
) -> list[Action]:
    """The group's slot pods: created where missing, ordered where their agent waits, an old
    attempt stopped first where one still runs; then the group's standbys go."""
    group = result.group
    if group is None:
        return []
    found: list[Action] = []
    pods = [by_name.get(slot_pod_name(job, slot)) for slot in group.slots]
    new = sum(1 for p in pods if p is None)
    if not any(p is not None and _label(p, ATTEMPT) == str(group.attempt) for p in pods):
        found.append(Replace(config_map(job)))  # a new attempt: the spec may have changed
        pod_group = options.gang.pod_group(job, group, members=new) if new else None
        if pod_group is not None:  # admits the pods this attempt creates, all at once; an
            found.append(Create(pod_group))  # older one stays while its pods do (the job owns it)
    yielding: list[Action] = []
    run_config = job.spec.run_config_yaml()  # once: a 1,024-worker attempt has 1,024 orders
    for rank, slot in enumerate(group.slots):
        name = slot_pod_name(job, slot)
        pod = by_name.get(name)
        standby = by_name.get(standby_name(job, slot))
        if standby is not None:
            yielding += _delete(standby, nodes, grace=0)
        if pod is None:
            found.append(Create(agent_pod(job, group, slot, options=options, members=new)))
            continue
        state, address = agents.get(name), agent_address(pod)
        if state is None or address is None or not state.agent or state.attempt == group.attempt:
            continue  # not answering yet, or already told
        if state.running and state.attempt is not None:
            found.append(Stop(name, address, state.attempt, STOP_GRACE))
            continue
        order = AttemptOrder(
            attempt=group.attempt,
            stage=group.stage,
            rank=rank,
            workers=group.world,
            run_config=run_config,
        )
        found.append(Order(name, address, order, group_labels(job, group, slot)))
    return found + yielding
