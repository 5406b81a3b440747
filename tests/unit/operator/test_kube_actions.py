"""What a pass does to a job's objects (``kube.actions``): the policies the planner leaves to
the Kubernetes backend (terminal phases, the rendezvous pod's health, stale workers, a new
attempt's config and gang, standbys), as data, for worker pods that run torchrun (a pod per
attempt; ``test_kube_agents.py`` has pods that run agents)."""

from __future__ import annotations

import copy
import threading
from datetime import UTC, datetime
from typing import Any

import kubernetes
import pytest
from pretrain_operator.api import (
    CheckpointStatus,
    JobStatus,
    Phase,
    StageStatus,
    WorkersStatus,
    parse_job,
)
from pretrain_operator.kube.actions import Action, Annotate, Create, Delete, Replace, actions
from pretrain_operator.kube.client import KubeClient, TemporaryApiError
from pretrain_operator.kube.objects import (
    Gang,
    Options,
    config_map,
    job_objects,
    rendezvous_pod,
    standby_pod,
    worker_pod,
)
from pretrain_operator.kube.reconcile import apply
from pretrain_operator.plan import Group, Plan

from tests.conftest import minimal_job, with_stage

JOB = parse_job(
    minimal_job(elastic={"minWorkers": 1, "maxWorkers": 2})
    | {"metadata": {"name": "demo", "namespace": "ml"}}
)
READY = {"n0": True, "n1": True, "down": False}
PODS = Options(agents=False)  # a pod per attempt, running torchrun (test_kube_agents: agents)
SETUP = [("create", o["kind"], o["metadata"]["name"]) for o in job_objects(JOB, PODS)]


def placed(pod: dict[str, Any], *, node: str | None = "n0", phase: str = "Running") -> dict:
    pod = copy.deepcopy(pod)
    if node is not None:
        pod["spec"]["nodeName"] = node
    pod["status"] = {"phase": phase}
    return pod


def worker(attempt: int, slot: int, *, slots: tuple[int, ...] = (0, 1), **kw: Any) -> dict:
    return placed(worker_pod(JOB, Group(stage=0, attempt=attempt, slots=slots), slot), **kw)


def standby(slot: int, **kw: Any) -> dict:
    return placed(standby_pod(JOB, slot), **kw)


RENDEZVOUS = placed(rendezvous_pod(JOB))


def running(attempt: int, slots: tuple[int, ...] = (0, 1), **update: Any) -> Plan:
    status = JobStatus(
        phase=Phase.RUNNING,
        attempt=attempt,
        stage=StageStatus(index=0, name="foundation"),
        workers=WorkersStatus(desired=len(slots), ready=len(slots), slots=list(slots)),
    )
    return Plan(group=Group(stage=0, attempt=attempt, slots=slots), status=status, **update)


def said(todo: list[Action]) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for action in todo:
        if isinstance(action, Create):
            out.append(("create", action.obj["kind"], action.obj["metadata"]["name"]))
        elif isinstance(action, Replace):
            out.append(("replace", action.obj["kind"], action.obj["metadata"]["name"]))
        else:
            assert isinstance(action, Delete)
            out.append(("delete", action.kind, action.name, action.grace))
    return out


def test_a_steady_group_needs_nothing() -> None:
    pods = [RENDEZVOUS, worker(1, 0), worker(1, 1)]
    assert actions(JOB, running(1), pods, nodes=READY, options=PODS) == []


@pytest.mark.parametrize("phase", [Phase.SUCCEEDED, Phase.FAILED, Phase.SUSPENDED])
def test_a_finished_or_suspended_job_deletes_every_pod_not_yet_going(phase: Phase) -> None:
    going = worker(1, 1)
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    pods = [RENDEZVOUS, worker(1, 0), going, standby(2)]
    result = Plan(group=None, status=JobStatus(phase=phase))
    assert said(actions(JOB, result, pods, nodes=READY, options=PODS)) == [
        ("delete", "Pod", "demo-rdzv", None),
        ("delete", "Pod", "demo-a1-w0", None),
        ("delete", "Pod", "demo-standby-w2", None),
    ]


@pytest.mark.parametrize(
    "rendezvous",
    [placed(rendezvous_pod(JOB), node="down"), placed(rendezvous_pod(JOB), phase="Failed")],
    ids=["on a node that is down", "failed"],
)
def test_a_rendezvous_pod_that_cannot_serve_is_replaced_at_once(rendezvous: dict) -> None:
    pods = [rendezvous, worker(1, 0), worker(1, 1)]
    todo = actions(JOB, running(1), pods, nodes=READY, options=PODS)
    assert said(todo) == [("delete", "Pod", "demo-rdzv", 0), *SETUP]


def deleting(pod: dict[str, Any]) -> dict[str, Any]:
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return pod


def test_pods_on_a_node_that_is_down_are_deleted_at_once_even_when_already_going() -> None:
    # No kubelet confirms a graceful deletion there: the pod would keep its name for good.
    pods = [deleting(placed(rendezvous_pod(JOB), node="down")), worker(1, 0), worker(1, 1)]
    todo = actions(JOB, running(1), pods, nodes=READY, options=PODS)
    assert said(todo) == [("delete", "Pod", "demo-rdzv", 0), *SETUP]
    lost = deleting(worker(1, 0, node="down"))
    result = Plan(group=None, status=JobStatus(phase=Phase.SUSPENDED))
    todo = actions(JOB, result, [lost, worker(1, 1)], nodes=READY, options=PODS)
    assert said(todo) == [("delete", "Pod", "demo-a1-w0", 0), ("delete", "Pod", "demo-a1-w1", None)]


def test_a_delete_names_the_uid_it_saw_so_a_newer_pod_of_that_name_survives() -> None:
    seen = placed(rendezvous_pod(JOB), node="down")
    seen["metadata"]["uid"] = "old-uid"
    todo = actions(JOB, running(1), [seen, worker(1, 0), worker(1, 1)], nodes=READY, options=PODS)
    assert isinstance(todo[0], Delete)
    assert todo[0].uid == "old-uid"


def test_a_worker_lost_with_its_node_frees_its_slot_for_a_standby() -> None:
    lost = deleting(worker(1, 1, node="down"))
    pods = [RENDEZVOUS, worker(2, 0, slots=(0,)), lost]
    todo = actions(JOB, running(2, slots=(0,)), pods, nodes=READY, options=PODS)
    assert said(todo) == [("delete", "Pod", "demo-a1-w1", 0), ("create", "Pod", "demo-standby-w1")]
    # Waiting for capacity after the loss: the lost worker of the attempt that ended goes too.
    waiting = Plan(group=None, status=JobStatus(phase=Phase.RESTARTING, attempt=1))
    pods = [RENDEZVOUS, worker(1, 0, node="down")]
    todo = actions(JOB, waiting, pods, nodes=READY, options=PODS)
    assert ("delete", "Pod", "demo-a1-w0", 0) in said(todo)
    stranded = standby(1, node="down")  # a standby whose node went: ask again elsewhere
    pods = [RENDEZVOUS, worker(2, 0, slots=(0,)), stranded]
    todo = actions(JOB, running(2, slots=(0,)), pods, nodes=READY, options=PODS)
    assert said(todo) == [("delete", "Pod", "demo-standby-w1", 0)]


def test_a_new_job_gets_its_objects_then_its_config_and_workers() -> None:
    todo = actions(JOB, running(1), [], nodes=READY, options=PODS)
    assert said(todo) == [
        *SETUP,
        ("replace", "ConfigMap", "demo-config"),
        ("create", "Pod", "demo-a1-w0"),
        ("create", "Pod", "demo-a1-w1"),
    ]


def test_a_new_attempt_stops_older_workers_and_replaces_standbys_after_its_workers() -> None:
    pods = [RENDEZVOUS, worker(1, 0), worker(1, 1, phase="Failed"), standby(1, node=None)]
    result = running(2, slots=(0, 1), stop=(0,))
    assert said(actions(JOB, result, pods, nodes=READY, options=PODS)) == [
        ("delete", "Pod", "demo-a1-w0", None),
        ("delete", "Pod", "demo-a1-w1", None),
        ("replace", "ConfigMap", "demo-config"),
        ("create", "Pod", "demo-a2-w0"),
        ("create", "Pod", "demo-a2-w1"),
        ("delete", "Pod", "demo-standby-w1", 0),
    ]


def test_a_group_left_half_created_keeps_its_standbys_until_every_worker_exists() -> None:
    # The pass that created worker 0 died before worker 1: the next creates worker 1, and only
    # then lets both standbys go (the creates of a pass go out at once).
    pods = [RENDEZVOUS, worker(2, 0), standby(0), standby(1, node="n1")]
    assert said(actions(JOB, running(2), pods, nodes=READY, options=PODS)) == [
        ("create", "Pod", "demo-a2-w1"),
        ("delete", "Pod", "demo-standby-w0", 0),
        ("delete", "Pod", "demo-standby-w1", 0),
    ]


def test_a_gang_gets_its_pod_group_before_its_pods_and_the_old_one_goes() -> None:
    options = Options(gang=Gang("volcano"), agents=False)
    todo = actions(JOB, running(3, slots=(0,)), [RENDEZVOUS], nodes=READY, options=options)
    assert said(todo)[:4] == [
        ("replace", "ConfigMap", "demo-config"),
        ("create", "PodGroup", "demo-a3"),
        ("delete", "PodGroup", "demo-a2", None),
        ("create", "Pod", "demo-a3-w0"),
    ]
    deleted = next(a for a in todo if isinstance(a, Delete))
    assert deleted.api_version == "scheduling.volcano.sh/v1beta1"


def test_idle_useful_slots_get_standbys_unless_a_worker_holds_them() -> None:
    pods = [RENDEZVOUS, worker(1, 0, slots=(0,))]
    todo = actions(JOB, running(1, slots=(0,)), pods, nodes=READY, options=PODS)
    assert said(todo) == [("create", "Pod", "demo-standby-w1")]
    old = worker(0, 1, slots=(1,), phase="Pending", node=None)  # an older worker still leaving
    todo = actions(JOB, running(1, slots=(0,)), [*pods, old], nodes=READY, options=PODS)
    assert ("create", "Pod", "demo-standby-w1") not in said(todo)


def test_standbys_stop_at_the_largest_group_that_trains_faster() -> None:
    """A batch of 6 micro-batches: 3 workers run 2 each, and 4 or 5 still run 2 on the longest
    rank, so slots 3 and 4 would only hold nodes: no standby asks for them."""
    doc = with_stage(
        minimal_job(elastic={"minWorkers": 1, "maxWorkers": 5}), globalBatchSize=6, microBatchSize=1
    )
    job = parse_job(doc | {"metadata": {"name": "demo", "namespace": "ml"}})
    pods = [placed(rendezvous_pod(job)), placed(worker_pod(job, Group(0, 1, (0,)), 0))]
    todo = actions(job, running(1, slots=(0,)), pods, nodes=READY, options=PODS)
    assert said(todo) == [
        ("create", "Pod", "demo-standby-w1"),
        ("create", "Pod", "demo-standby-w2"),
    ]


def test_standbys_yield_while_the_group_is_being_placed_and_failed_ones_ask_again() -> None:
    placing = [RENDEZVOUS, worker(2, 0, slots=(0,), node=None, phase="Pending")]
    waiting = standby(1, node=None, phase="Pending")
    todo = actions(JOB, running(2, slots=(0,)), [*placing, waiting], nodes=READY, options=PODS)
    assert said(todo) == [("delete", "Pod", "demo-standby-w1", 0)]
    evicted = standby(1, phase="Failed")
    steady = [RENDEZVOUS, worker(2, 0, slots=(0,))]
    todo = actions(JOB, running(2, slots=(0,)), [*steady, evicted], nodes=READY, options=PODS)
    assert said(todo) == [("delete", "Pod", "demo-standby-w1", None)]
    assert isinstance(todo[0], Delete)
    assert todo[0].pod is evicted  # what the watch cache's expectations remember


def test_a_refused_job_with_an_unreadable_status_still_gets_its_invalid_spec_status() -> None:
    from datetime import UTC, datetime

    from pretrain_operator.kube.reconcile import invalid
    from pretrain_trainer.config import SpecError

    body = minimal_job(image="")
    body["status"] = {"conditions": "not a list", "attempt": "many"}
    with pytest.raises(SpecError) as refused:
        parse_job(body)
    status = invalid(body, refused.value, datetime(2026, 1, 1, tzinfo=UTC))
    assert status.phase == Phase.FAILED
    assert status.conditions[0].reason == "InvalidSpec"
    assert "spec.image" in status.conditions[0].message


class Recorder(KubeClient):
    """Records the writes a pass sends, from several threads; refuses one create."""

    def __init__(self, *, refuse: str | None = None) -> None:
        super().__init__(kubernetes.client.ApiClient())  # never sends: writes are recorded
        self.refuse, self.sent, self.lock = refuse, [], threading.Lock()

    def create(self, obj: Any, *, namespace: str) -> dict[str, Any] | None:
        with self.lock:
            self.sent.append(("create", obj["metadata"]["name"]))
        if obj["metadata"]["name"] == self.refuse:
            raise TemporaryApiError(503, "refused")
        return dict(obj)

    def delete(self, kind: str, name: str, **_: Any) -> bool:
        with self.lock:
            self.sent.append(("delete", name))
        return True

    def replace_or_create(self, obj: Any, *, namespace: str) -> None:
        with self.lock:
            self.sent.append(("replace", obj["metadata"]["name"]))


def test_apply_sends_a_run_of_pod_writes_at_once_and_stops_after_a_failed_run() -> None:
    group = Group(stage=0, attempt=1, slots=tuple(range(6)))
    creates = [Create(worker_pod(JOB, group, slot)) for slot in range(6)]
    deletes = [Delete("Pod", f"demo-standby-w{slot}") for slot in range(6)]
    todo: list[Action] = [Replace(config_map(JOB)), *creates, *deletes]
    client = Recorder()
    applied = apply(client, todo, namespace="ml", in_flight=4)
    assert client.sent[0] == ("replace", "demo-config")
    assert sorted(client.sent[1:7]) == [("create", f"demo-a1-w{s}") for s in range(6)]
    assert sorted(client.sent[7:]) == [("delete", f"demo-standby-w{s}") for s in range(6)]
    assert len(applied.created) == 6
    refusing = Recorder(refuse="demo-a1-w2")
    with pytest.raises(TemporaryApiError):
        apply(refusing, todo, namespace="ml", in_flight=4)
    assert len([s for s in refusing.sent if s[0] == "create"]) == 6  # the run went out whole
    assert [s for s in refusing.sent if s[0] == "delete"] == []  # nothing after it did


def test_the_running_workers_carry_the_newest_checkpoint_once() -> None:
    saved = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
    newest = CheckpointStatus(stage=0, step=40, path="stage-0/step-40", saved_at=saved)
    plan = running(1)
    plan = Plan(group=plan.group, status=plan.status.model_copy(update={"last_checkpoint": newest}))
    pods = [RENDEZVOUS, worker(1, 0), worker(1, 1, phase="Pending"), worker(0, 1, phase="Failed")]
    todo = [
        a for a in actions(JOB, plan, pods, nodes=READY, options=PODS) if isinstance(a, Annotate)
    ]
    wanted = {
        "pretrain.dev/last-checkpoint-time": "2026-12-01T08:30:00Z",
        "pretrain.dev/last-checkpoint-step": "0/40",
    }
    assert todo == [Annotate(worker(1, 0)["metadata"]["name"], wanted)]  # running, this attempt
    annotated = worker(1, 0)
    annotated["metadata"]["annotations"] = wanted
    again = actions(JOB, plan, [RENDEZVOUS, annotated], nodes=READY, options=PODS)
    assert not [a for a in again if isinstance(a, Annotate)]  # already said: no write
