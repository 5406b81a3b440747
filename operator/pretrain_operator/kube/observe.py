"""What the planner sees, read from a job's pods (and its nodes' readiness). Pure.

One :class:`~pretrain_operator.plan.Worker` per slot:

- the worker pod of the current attempt: Pending, Running, Succeeded (with the stage report
  from its termination message) or Failed (the trainer's exit code from that report, since
  torchrun exits 1 whatever its worker said); *lost* when it is being deleted, was evicted or
  preempted, carries a ``DisruptionTarget`` condition, or its node is NotReady; a slot of the
  group whose pod is gone is lost too;
- otherwise a worker pod of an older attempt that still runs (Running, so the plan stops it);
- otherwise the slot's standby pod: Running on a ready node means capacity (Idle); Pending
  means capacity on its way, unless the scheduler found no node for it (Unschedulable): then
  the slot is not reported, and no group waits for it.

When worker pods run agents (:func:`observe_agents`), a slot's pod outlives attempts and its
agent's state (``GET /`` on the pod, read by the caller) says what runs there: the current
attempt Running or exited (with the report the agent kept), an older one still leaving, or
nothing (Idle: warm capacity). The pod itself is lost as above; a pod whose agent ended (the
container exited) is a failed worker of the attempt it ran.

The export's newest try (:func:`observe_export`) is its pod: Pending, Running, Succeeded, or
Failed with its exit code and the last line of its logs (its termination message); lost as a
worker is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from pretrain_trainer.contract import AgentState, FailureReport, StageReport, parse_report

from ..plan import ExportRun, Observed, Worker, WorkerState, agent_exited, exited
from .objects import (
    ALIVE,
    ATTEMPT,
    CONTAINER,
    EXPORT,
    FINISHED,
    ROLE,
    SLOT,
    STAGE,
    STANDBY,
    WORKER,
    PodPhase,
)

LOST_REASONS = (
    "Evicted",
    "Preempting",
    "Preempted",
    "NodeLost",
    "Shutdown",
    "Terminated",
    "NodeShutdown",
    "DeadlineExceeded",
    "UnexpectedAdmissionError",
)


def node_ready(node: Mapping[str, Any]) -> bool:
    """Whether a Node's Ready condition is True."""
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def ready_nodes(nodes: Iterable[Mapping[str, Any]]) -> dict[str, bool]:
    """Node name -> whether its Ready condition is True."""
    return {node["metadata"]["name"]: node_ready(node) for node in nodes}


def _int_label(pod: Mapping[str, Any], key: str) -> int | None:
    value = pod["metadata"].get("labels", {}).get(key)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            return state.get("terminated") or {}
    return {}


def termination_report(pod: Mapping[str, Any]) -> StageReport | FailureReport | None:
    """The trainer's report from the container's termination message, if it left one."""
    return parse_report(_terminated(pod).get("message"))


def _lost_because(pod: Mapping[str, Any], nodes: Mapping[str, bool]) -> str | None:
    metadata, status = pod["metadata"], pod.get("status", {})
    if metadata.get("deletionTimestamp"):
        return "deleted"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return "preempted" if "Preempt" in (condition.get("reason") or "") else "evicted"
    phase = PodPhase.of(pod)
    if phase == PodPhase.FAILED and status.get("reason") in LOST_REASONS:
        return "evicted" if status["reason"] == "Evicted" else status["reason"].lower()
    node = pod.get("spec", {}).get("nodeName")
    if node and phase in ALIVE and not nodes.get(node, False):
        return f"node {node} not ready"
    return None


def _time(value: object) -> float | None:
    """A Kubernetes timestamp (RFC 3339) as Unix time; None when absent or unreadable."""
    if not isinstance(value, str):
        return value.timestamp() if isinstance(value, datetime) else None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def bound_at(pod: Mapping[str, Any]) -> float | None:
    """When the scheduler bound the pod to its node (its PodScheduled condition)."""
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "True":
            return _time(condition.get("lastTransitionTime"))
    return None


def unschedulable(pod: Mapping[str, Any]) -> bool:
    """Whether the scheduler tried the pod and found no node for it (no capacity is coming
    until something changes: a node returns, or another pod leaves)."""
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return bool(condition.get("reason") == "Unschedulable")
    return False


def ended_at(pod: Mapping[str, Any]) -> float | None:
    """When the pod's worker ended, as far as the cluster says: its container's end, or the
    moment its deletion was asked for (the deadline less the grace period)."""
    finished = _time(_terminated(pod).get("finishedAt"))
    if finished is not None:
        return finished
    metadata = pod["metadata"]
    deadline = _time(metadata.get("deletionTimestamp"))
    if deadline is not None:
        return deadline - float(metadata.get("deletionGracePeriodSeconds") or 0)
    return None


def _worker(pod: Mapping[str, Any], slot: int, nodes: Mapping[str, bool]) -> Worker:
    attempt, stage = _int_label(pod, ATTEMPT), _int_label(pod, STAGE)
    lost = _lost_because(pod, nodes)
    if lost is not None:
        return Worker(
            slot=slot,
            state=WorkerState.LOST,
            attempt=attempt,
            stage=stage,
            reason=lost,
            ended_at=ended_at(pod),
        )
    phase = PodPhase.of(pod) or PodPhase.PENDING
    if phase == PodPhase.RUNNING:
        return Worker(
            slot=slot,
            state=WorkerState.RUNNING,
            attempt=attempt,
            stage=stage,
            bound_at=bound_at(pod),
        )
    if phase in FINISHED:
        code = _terminated(pod).get("exitCode")
        worker = exited(
            slot=slot,
            attempt=attempt,
            stage=stage,
            succeeded=phase == PodPhase.SUCCEEDED,
            exit_code=code if isinstance(code, int) else None,
            report=termination_report(pod),
        )
        return replace(worker, ended_at=ended_at(pod))
    return Worker(
        slot=slot, state=WorkerState.PENDING, attempt=attempt, stage=stage, bound_at=bound_at(pod)
    )


def observe(
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, bool],
    *,
    attempt: int,
    group_slots: Iterable[int],
    slots: int = 0,
) -> Observed:
    """Workers per slot from the job's pods; ``attempt`` and ``group_slots`` come from the
    status: the current attempt's slots whose pod is gone are reported lost. Of the first
    ``slots`` (those worth a pod), one with no pod yet, or whose old worker is leaving, is
    capacity on its way (Pending): a standby is about to ask for it."""
    current: dict[int, Mapping[str, Any]] = {}
    older: dict[int, Mapping[str, Any]] = {}
    standby: dict[int, Mapping[str, Any]] = {}
    for pod in pods:
        role, slot = pod["metadata"].get("labels", {}).get(ROLE), _int_label(pod, SLOT)
        if slot is None:
            continue
        if role == WORKER and _int_label(pod, ATTEMPT) == attempt:
            current[slot] = pod
        elif role == WORKER and PodPhase.of(pod) in ALIVE:
            older[slot] = pod
        elif role == STANDBY:
            standby[slot] = pod
    workers = []
    group = set(group_slots)
    for slot in sorted(group | set(current) | set(older) | set(standby) | set(range(slots))):
        if slot in current:
            workers.append(_worker(current[slot], slot, nodes))
        elif slot in group:
            workers.append(
                Worker(slot=slot, state=WorkerState.LOST, attempt=attempt, reason="pod deleted")
            )
        elif slot in older and (old := _worker(older[slot], slot, nodes)).state in (
            WorkerState.RUNNING,
            WorkerState.PENDING,
        ):
            workers.append(
                Worker(slot=slot, state=WorkerState.RUNNING, attempt=old.attempt, stage=old.stage)
            )
        elif slot in older and slot not in standby:
            if slot < slots:
                workers.append(Worker(slot=slot, state=WorkerState.PENDING))  # leaving
        elif slot in standby and unschedulable(standby[slot]):
            continue  # no node for it: not capacity on its way, so nothing waits for it
        elif slot in standby:  # a standby stands for its slot even beside a lost old worker
            waiting = _worker(standby[slot], slot, nodes)
            state = (
                WorkerState.IDLE if waiting.state == WorkerState.RUNNING else (WorkerState.PENDING)
            )
            workers.append(Worker(slot=slot, state=state))
        else:  # below ``slots``, and nothing there yet
            workers.append(Worker(slot=slot, state=WorkerState.PENDING))
    return Observed(tuple(workers))


def _agent_worker(
    pod: Mapping[str, Any],
    state: AgentState | None,
    slot: int,
    nodes: Mapping[str, bool],
    *,
    attempt: int,
    in_group: bool,
) -> Worker | None:
    """What runs in a slot pod, from the pod and its agent's state (None: not answering)."""
    last = _int_label(pod, ATTEMPT)  # the attempt it was last ordered (or created) for
    lost = _lost_because(pod, nodes)
    if lost is not None:
        ran = state.attempt if state is not None and state.attempt is not None else last
        return Worker(
            slot=slot, state=WorkerState.LOST, attempt=ran, reason=lost, ended_at=ended_at(pod)
        )
    phase = PodPhase.of(pod) or PodPhase.PENDING
    if phase in FINISHED:  # the agent itself ended, and whatever it ran with it
        if not in_group:
            return None  # goes; the slot is capacity again once a new pod asks for it
        code = _terminated(pod).get("exitCode")
        worker = exited(
            slot=slot,
            attempt=attempt,
            stage=_int_label(pod, STAGE),
            succeeded=False,
            exit_code=code if isinstance(code, int) and code else 1,
            report=None,
        )
        return replace(worker, ended_at=ended_at(pod))
    if phase == PodPhase.PENDING or state is None or not state.agent:
        # Not placed yet, or its agent still importing: capacity (or a group member) on its way.
        return Worker(
            slot=slot,
            state=WorkerState.PENDING,
            attempt=attempt if in_group else None,
            bound_at=bound_at(pod) if in_group else None,
        )
    if state.attempt == attempt and in_group:
        if state.running:
            return Worker(
                slot=slot,
                state=WorkerState.RUNNING,
                attempt=attempt,
                stage=state.stage,
                bound_at=state.started_at,  # when it was told: the pod was already there
            )
        return agent_exited(slot, state)
    if in_group:  # told of an older attempt: the order is on its way once that one left
        return Worker(slot=slot, state=WorkerState.PENDING, attempt=attempt)
    if state.running:  # an older attempt, still running: the plan stops it
        return Worker(
            slot=slot, state=WorkerState.RUNNING, attempt=state.attempt, stage=state.stage
        )
    return Worker(slot=slot, state=WorkerState.IDLE)  # a warm agent with nothing to run


def observe_agents(
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, bool],
    agents: Mapping[str, AgentState | None],
    *,
    attempt: int,
    group_slots: Iterable[int],
    slots: int = 0,
) -> Observed:
    """Workers per slot when worker pods run agents; ``agents``: pod name -> its agent's
    state, None where it did not answer. A slot of the group without its pod is lost; a
    standby stands for a slot without one, as in :func:`observe`."""
    slot_pods: dict[int, Mapping[str, Any]] = {}
    standby: dict[int, Mapping[str, Any]] = {}
    for pod in pods:
        role, slot = pod["metadata"].get("labels", {}).get(ROLE), _int_label(pod, SLOT)
        if slot is None:
            continue
        if role == WORKER:
            slot_pods[slot] = pod
        elif role == STANDBY:
            standby[slot] = pod
    group = set(group_slots)
    workers = []
    for slot in sorted(group | set(slot_pods) | set(standby) | set(range(slots))):
        slot_pod = slot_pods.get(slot)
        worker = None
        if slot_pod is not None:
            state = agents.get(slot_pod["metadata"]["name"])
            worker = _agent_worker(
                slot_pod, state, slot, nodes, attempt=attempt, in_group=slot in group
            )
        if worker is None and slot in group:
            worker = Worker(
                slot=slot, state=WorkerState.LOST, attempt=attempt, reason="pod deleted"
            )
        if worker is not None and worker.state == WorkerState.PENDING and slot not in group:
            # A pod made for a group the status does not know (the pass that created it died)
            # or one that lost its group before it was placed: its slot's standby, if any,
            # still says what the slot has, so the next pass decides what the last one did.
            worker = None if slot in standby else worker
        if worker is None and slot in standby and unschedulable(standby[slot]):
            continue  # no node for it: not capacity on its way, so nothing waits for it
        if worker is None and slot in standby:
            placed = _worker(standby[slot], slot, nodes).state == WorkerState.RUNNING
            worker = Worker(slot=slot, state=WorkerState.IDLE if placed else WorkerState.PENDING)
        if worker is None and slot < slots:
            worker = Worker(slot=slot, state=WorkerState.PENDING)
        if worker is not None:
            workers.append(worker)
    return Observed(tuple(workers))


def observe_export(
    pods: Iterable[Mapping[str, Any]], nodes: Mapping[str, bool]
) -> ExportRun | None:
    """The newest try of the export, from its pod; None before the first."""
    tries = {
        attempt: pod
        for pod in pods
        if pod["metadata"].get("labels", {}).get(ROLE) == EXPORT
        and (attempt := _int_label(pod, ATTEMPT)) is not None
    }
    if not tries:
        return None
    attempt = max(tries)
    pod = tries[attempt]
    lost = _lost_because(pod, nodes)
    if lost is not None:
        return ExportRun(attempt=attempt, state=WorkerState.LOST, message=lost)
    phase = PodPhase.of(pod) or PodPhase.PENDING
    if phase == PodPhase.SUCCEEDED:
        return ExportRun(attempt=attempt, state=WorkerState.SUCCEEDED, exit_code=0)
    if phase == PodPhase.FAILED:
        terminated = _terminated(pod)
        code = terminated.get("exitCode")
        lines = str(terminated.get("message") or "").strip().splitlines()
        return ExportRun(
            attempt=attempt,
            state=WorkerState.FAILED,
            exit_code=code if isinstance(code, int) else None,
            message=lines[-1][:500] if lines else None,
        )
    state = WorkerState.RUNNING if phase == PodPhase.RUNNING else WorkerState.PENDING
    return ExportRun(attempt=attempt, state=state)
