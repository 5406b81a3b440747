"""Worker pods that run agents, as data: what a slot pod and its agent's state read as
(``observe_agents``), and what a pass does about them (``actions`` with ``Options.agents``):
orders to warm agents instead of new pods, stops instead of deletions."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pretrain_operator.api import parse_job
from pretrain_operator.kube.actions import Create, Delete, Order, Stop, actions
from pretrain_operator.kube.agents import AgentCache
from pretrain_operator.kube.objects import (
    ATTEMPTS_DIR,
    MEMORY_DIR,
    Gang,
    Options,
    agent_pod,
    rendezvous_pod,
    standby_pod,
)
from pretrain_operator.kube.observe import observe_agents
from pretrain_operator.plan import Group, Worker, WorkerState
from pretrain_trainer import contract
from pretrain_trainer.agent_client import AgentError
from pretrain_trainer.contract import AgentState

from tests.conftest import minimal_job
from tests.unit.operator.test_kube_actions import running

S = WorkerState
JOB = parse_job(
    minimal_job(elastic={"minWorkers": 1, "maxWorkers": 2})
    | {"metadata": {"name": "demo", "namespace": "ml"}}
)
AGENTS = Options(agents=True)
READY = {"n0": True, "n1": True, "down": False}
REPORT = {"finished": True, "stage": 0, "step": 40, "tokens": 9, "loss": 2.5, "checkpoint": "/c"}


def slot_pod(slot: int, *, attempt: int = 1, node: str = "n0", phase: str = "Running") -> dict:
    pod = copy.deepcopy(agent_pod(JOB, Group(stage=0, attempt=attempt, slots=(0, 1)), slot))
    pod["spec"]["nodeName"] = node
    pod["status"] = {"phase": phase, "podIP": f"10.0.0.{slot + 1}"}
    return pod


def idle() -> AgentState:
    return AgentState(agent="a")


def ran(attempt: int, *, running: bool = True, code: int | None = None, **kw: Any) -> AgentState:
    return AgentState(
        agent="a", attempt=attempt, stage=0, running=running, exit_code=code, started_at=5.0, **kw
    )


def test_a_slot_pod_runs_the_agent_with_its_memory_tier_in_memory_and_no_attempt_in_its_name() -> (
    None
):
    pod = agent_pod(JOB, Group(stage=0, attempt=3, slots=(0, 1)), 1)
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert pod["metadata"]["name"] == "demo-w1"
    assert container["command"][:3] == ["python", "-m", "pretrain_trainer.agent"]
    assert f"--dir={ATTEMPTS_DIR}" in container["command"]
    assert env[contract.ENV_MEMORY_ROOT] == MEMORY_DIR
    assert env[contract.ENV_STORE] == "demo-rdzv.demo.ml.svc:29400"
    assert contract.ENV_ATTEMPT not in env  # each order says it
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["memory"]["emptyDir"] == {"medium": "Memory"}
    assert container["livenessProbe"]["httpGet"]["port"] == "agent"
    # An attempt's end turns the pod not ready: the event that tells the operator.
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "agent"}
    assert {"name": "agent", "containerPort": contract.AGENT_PORT} in container["ports"]
    labels = pod["metadata"]["labels"]
    assert (labels["pretrain.dev/attempt"], labels["pretrain.dev/rank"]) == ("3", "1")


@pytest.mark.parametrize(
    ("pod", "state", "expected"),
    [
        (slot_pod(0, phase="Pending"), None, Worker(0, S.PENDING, attempt=2)),
        (slot_pod(0), None, Worker(0, S.PENDING, attempt=2)),  # its agent still importing
        (slot_pod(0), ran(2), Worker(0, S.RUNNING, attempt=2, stage=0, bound_at=5.0)),
        (slot_pod(0), ran(1, running=False, code=1), Worker(0, S.PENDING, attempt=2)),
        (slot_pod(0), ran(1), Worker(0, S.PENDING, attempt=2)),  # the old one still leaving
        (
            slot_pod(0),
            ran(2, running=False, code=1),
            Worker(0, S.FAILED, attempt=2, stage=0, exit_code=1),
        ),
        (
            slot_pod(0, node="down"),
            ran(2),
            Worker(0, S.LOST, attempt=2, reason="node down not ready"),
        ),
    ],
)
def test_a_slot_pod_of_the_group_reads_as_what_its_agent_runs(
    pod: dict, state: AgentState | None, expected: Worker
) -> None:
    observed = observe_agents(
        [pod], READY, {pod["metadata"]["name"]: state}, attempt=2, group_slots=[0], slots=1
    )
    assert observed.workers == (expected,)


def test_a_finished_stage_is_read_from_the_report_the_agent_kept() -> None:
    state = ran(2, running=False, code=0, report=json.dumps(REPORT), ended_at=9.0)
    pod = slot_pod(0)
    (worker,) = observe_agents(
        [pod], READY, {"demo-w0": state}, attempt=2, group_slots=[0], slots=1
    ).workers
    assert (worker.state, worker.ended_at) == (S.SUCCEEDED, 9.0)
    assert worker.report is not None
    assert worker.report.step == 40


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (idle(), Worker(1, S.IDLE)),  # warm capacity
        (ran(1, running=False, code=0), Worker(1, S.IDLE)),
        (ran(1), Worker(1, S.RUNNING, attempt=1, stage=0)),  # the plan stops it
    ],
)
def test_a_slot_pod_outside_the_group_is_warm_capacity_once_its_attempt_ended(
    state: AgentState, expected: Worker
) -> None:
    pods = [slot_pod(0), slot_pod(1)]
    states = {"demo-w0": ran(2), "demo-w1": state}
    observed = observe_agents(pods, READY, states, attempt=2, group_slots=[0], slots=2)
    assert observed.workers[1] == expected


def test_a_group_slot_whose_pod_is_gone_is_lost_and_one_whose_agent_died_failed() -> None:
    died = slot_pod(1, phase="Failed")
    died["status"]["containerStatuses"] = [
        {"name": "trainer", "state": {"terminated": {"exitCode": 137}}}
    ]
    observed = observe_agents([died], READY, {}, attempt=2, group_slots=[0, 1], slots=2)
    assert [(w.slot, w.state) for w in observed.workers] == [(0, S.LOST), (1, S.FAILED)]
    assert observed.workers[1].exit_code == 137


def test_a_new_attempt_orders_the_warm_agents_and_creates_no_pod() -> None:
    pods = [placed_rendezvous(), slot_pod(0), slot_pod(1)]
    states = {"demo-w0": ran(1, running=False, code=1), "demo-w1": ran(1, running=False, code=0)}
    todo = actions(JOB, running(2), pods, nodes=READY, options=AGENTS, agents=states)
    assert not [a for a in todo if isinstance(a, Create)]
    orders = [a for a in todo if isinstance(a, Order)]
    assert [(o.name, o.address, o.order.rank, o.order.workers) for o in orders] == [
        ("demo-w0", f"10.0.0.1:{contract.AGENT_PORT}", 0, 2),
        ("demo-w1", f"10.0.0.2:{contract.AGENT_PORT}", 1, 2),
    ]
    assert orders[0].order.attempt == 2
    assert orders[0].order.run_config == JOB.spec.run_config_yaml()  # not a trailing mount
    assert orders[1].labels["pretrain.dev/attempt"] == "2"


def test_an_agent_still_running_the_old_attempt_is_stopped_before_its_order() -> None:
    pods = [placed_rendezvous(), slot_pod(0), slot_pod(1)]
    states = {"demo-w0": ran(1), "demo-w1": ran(2)}
    todo = actions(JOB, running(2), pods, nodes=READY, options=AGENTS, agents=states)
    assert [(type(a), a.name) for a in todo if isinstance(a, Order | Stop)] == [(Stop, "demo-w0")]


def test_a_shrunk_group_stops_the_slot_it_left_and_keeps_its_pod_warm() -> None:
    pods = [placed_rendezvous(), slot_pod(0, attempt=2), slot_pod(1)]
    states = {"demo-w0": ran(2), "demo-w1": ran(1)}
    todo = actions(
        JOB, running(2, slots=(0,), stop=(1,)), pods, nodes=READY, options=AGENTS, agents=states
    )
    assert [(type(a), getattr(a, "name", None)) for a in todo] == [(Stop, "demo-w1")]
    quiet = {"demo-w0": ran(2), "demo-w1": ran(1, running=False, code=143)}
    todo = actions(JOB, running(2, slots=(0,)), pods, nodes=READY, options=AGENTS, agents=quiet)
    assert todo == []  # idle and useful: no standby, no deletion


def test_a_slot_pod_on_a_lost_node_goes_at_once_and_its_slot_gets_a_standby_later() -> None:
    pods = [placed_rendezvous(), slot_pod(0), slot_pod(1, node="down")]
    states = {"demo-w0": ran(3)}
    todo = actions(JOB, running(3, slots=(0,)), pods, nodes=READY, options=AGENTS, agents=states)
    deletes = [(a.name, a.grace) for a in todo if isinstance(a, Delete)]
    assert deletes == [("demo-w1", 0)]


def test_a_group_slot_without_a_pod_gets_one_and_its_standby_goes_after() -> None:
    standby = copy.deepcopy(standby_pod(JOB, 1))
    standby["spec"]["nodeName"], standby["status"] = "n1", {"phase": "Running"}
    pods = [placed_rendezvous(), slot_pod(0), standby]
    states = {"demo-w0": ran(2, running=False, code=0)}
    todo = actions(JOB, running(3), pods, nodes=READY, options=AGENTS, agents=states)
    kinds = [
        (type(a).__name__, getattr(a, "name", None) or a.obj["metadata"]["name"]) for a in todo
    ]
    assert kinds == [
        ("Replace", "demo-config"),  # a new attempt: the spec may have changed
        ("Order", "demo-w0"),
        ("Create", "demo-w1"),
        ("Delete", "demo-standby-w1"),
    ]


def placed_rendezvous() -> dict[str, Any]:
    pod = copy.deepcopy(rendezvous_pod(JOB))
    pod["spec"]["nodeName"], pod["status"] = "n0", {"phase": "Running"}
    return pod


def test_with_agents_too_a_standby_with_no_node_is_not_waited_for() -> None:
    stuck = copy.deepcopy(standby_pod(JOB, 1))
    stuck["status"] = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
    }
    observed = observe_agents(
        [slot_pod(0), stuck], READY, {"demo-w0": ran(2)}, attempt=2, group_slots=[0], slots=2
    )
    assert [w.slot for w in observed.workers] == [0]


def test_a_pod_of_a_group_the_status_does_not_know_leaves_its_slot_to_its_standby() -> None:
    """The pass that created it died before the status: the next one must see what it saw."""
    made = slot_pod(0, phase="Pending")
    del made["spec"]["nodeName"]
    standby = copy.deepcopy(standby_pod(JOB, 0))
    standby["spec"]["nodeName"], standby["status"] = "n0", {"phase": "Running"}
    observed = observe_agents([made, standby], READY, {}, attempt=0, group_slots=[], slots=1)
    assert observed.workers == (Worker(0, S.IDLE),)


def test_an_unplaced_slot_pod_outside_the_group_yields_while_the_group_is_placed() -> None:
    left = slot_pod(1, phase="Pending")
    del left["spec"]["nodeName"]
    group = slot_pod(0, attempt=2, phase="Pending")
    del group["spec"]["nodeName"]
    todo = actions(
        JOB,
        running(2, slots=(0,)),
        [placed_rendezvous(), group, left],
        nodes=READY,
        options=AGENTS,
        agents={},
    )
    assert [(type(a), getattr(a, "name", None)) for a in todo] == [(Delete, "demo-w1")]


class Answers:
    """Stands for the network: each address's agent answers with what the test says."""

    def __init__(self) -> None:
        self.states: dict[str, AgentState | None] = {}
        self.asked: list[str] = []

    def connect(self, address: str) -> Any:
        answers = self

        class Client:
            def state(self) -> AgentState:
                answers.asked.append(address)
                state = answers.states.get(address)
                if state is None:
                    raise AgentError(f"{address}: no answer")
                return state

        return Client()


def test_the_agent_cache_reads_again_only_changed_or_silent_pods_and_all_of_them_at_refresh() -> (
    None
):
    clock = [0.0]
    answers = Answers()
    cache = AgentCache(refresh_seconds=15, connect=answers.connect, clock=lambda: clock[0])
    w0, w1 = slot_pod(0), slot_pod(1)
    w0["metadata"]["resourceVersion"], w1["metadata"]["resourceVersion"] = "1", "1"
    a0, a1 = f"10.0.0.1:{contract.AGENT_PORT}", f"10.0.0.2:{contract.AGENT_PORT}"
    answers.states = {a0: ran(1), a1: None}  # w1's agent still starting
    assert cache([w0, w1]) == {"demo-w0": ran(1), "demo-w1": None}
    answers.states[a1] = ran(1)
    clock[0] = 1
    assert cache([w0, w1])["demo-w1"] == ran(1)  # it said nothing last time: asked again
    assert answers.asked == [a0, a1, a1]
    clock[0] = 2
    assert cache([w0, w1]) == {"demo-w0": ran(1), "demo-w1": ran(1)}
    assert answers.asked == [a0, a1, a1]  # a steady pass reads no agent
    answers.states[a0] = ran(1, running=False, code=1)
    w0["metadata"]["resourceVersion"] = "2"  # its readiness changed
    assert cache([w0, w1])["demo-w0"] == ran(1, running=False, code=1)
    assert answers.asked == [a0, a1, a1, a0]
    clock[0] = 20  # the safety net: everyone again
    cache([w0])
    assert answers.asked[-1:] == [a0]
    assert "demo-w1" not in cache([w0])  # a pod that went is forgotten


def test_a_gang_admits_only_the_pods_an_attempt_creates() -> None:
    gang = Options(agents=True, gang=Gang("volcano"))
    standby = copy.deepcopy(standby_pod(JOB, 1))
    standby["spec"]["nodeName"], standby["status"] = "n1", {"phase": "Running"}
    pods = [placed_rendezvous(), slot_pod(0), standby]
    states = {"demo-w0": ran(2, running=False, code=0)}
    todo = actions(JOB, running(3), pods, nodes=READY, options=gang, agents=states)
    created = [a.obj for a in todo if isinstance(a, Create)]
    assert [(o["kind"], o["metadata"]["name"]) for o in created] == [
        ("PodGroup", "demo-a3"),
        ("Pod", "demo-w1"),
    ]
    assert created[0]["spec"]["minMember"] == 1  # the surviving pod is already running
    annotations = created[1]["metadata"]["annotations"]
    assert annotations["scheduling.k8s.io/group-name"] == "demo-a3"
    assert not [a for a in todo if isinstance(a, Delete) and a.kind == "PodGroup"]
