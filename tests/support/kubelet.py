"""The test kubelet: plays the nodes of a real control plane (``controlplane.py``).

It creates Node objects with capacity (cpu, memory, ``nvidia.com/gpu``) and a Ready condition,
and does for the pods the real scheduler binds to them what a kubelet does, through the API:
marks them Running (ready, with an IP), confirms graceful deletions as a container exiting at
once on SIGTERM, and, when a test says so, ends them as Succeeded or Failed with a termination
message (the trainer's report). A node taken away (NotReady) has no kubelet: its pods stay as
they are, including those being deleted, as on a real cluster. Each kubelet serves one
namespace, so tests sharing a control plane do not act on each other's pods.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from itertools import count
from typing import Any

import kubernetes
from pretrain_operator.kube.client import ApiError, KubeClient
from pretrain_trainer import contract
from pretrain_trainer.agent import http_handler

from tests.support.controlplane import ControlPlane

ROLE = "pretrain.dev/role"
CONTAINER = "trainer"
_NODES = count()
_ADDRESSES = count(1)
MERGE = "application/merge-patch+json"
UNREACHABLE, UNREACHABLE_EFFECTS = "node.kubernetes.io/unreachable", ("NoSchedule", "NoExecute")
# Where a resource lives: its API path prefix, and whether it is namespaced.
RESOURCES = {
    "pods": ("/api/v1", True),
    "services": ("/api/v1", True),
    "configmaps": ("/api/v1", True),
    "serviceaccounts": ("/api/v1", True),
    "events": ("/api/v1", True),
    "nodes": ("/api/v1", False),
    "pretrainjobs": ("/apis/pretrain.dev/v1alpha1", True),
    "podgroups": ("/apis/scheduling.volcano.sh/v1beta1", True),
}


def eventually(check: Callable[[], Any], *, timeout: float = 30.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not in {timeout:.0f}s: {what or check}")
        time.sleep(0.05)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Kubelet:
    def __init__(
        self,
        plane: ControlPlane,
        namespace: str,
        *,
        nodes: int = 2,
        gpus: int = 8,
        workers: int = 8,
    ) -> None:
        self.plane, self.namespace, self.gpus = plane, namespace, gpus
        # The kubelets and the test: its requests are not the operator's.
        self.client = KubeClient(plane.client(), field_manager="kubelet")
        self._core: Any = kubernetes.client.CoreV1Api(self.client.api)
        self.lock = threading.Lock()
        self.ready: dict[str, bool] = {}  # our nodes, and whether each is Ready
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubelet")
        self._running: set[str] = set()  # pod uids marked Running
        # When (time.monotonic()) this kubelet first saw each pod bound to one of its nodes, and
        # when its Running status was written: the scheduler's and the kubelets' shares.
        self.bound_at: dict[str, float] = {}
        self.running_at: dict[str, float] = {}
        self.agents: dict[str, AgentDouble] = {}  # pod name -> what answers as its agent
        self.agent_nodes: dict[str, str] = {}  # pod name -> its node
        self._addresses: dict[str, str] = {}  # pod uid -> its loopback address
        for _ in range(nodes):
            self.add_node()

    # -- nodes -------------------------------------------------------------------------------
    def add_node(self) -> str:
        name = f"{self.namespace}-node-{next(_NODES)}"
        capacity = {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": str(self.gpus)}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            # Nodes are the one kind whose status is taken from a create.
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [self._condition(True)],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            },
        }
        self.client.request("POST", "/api/v1/nodes", body=node)
        # The API server taints every new node not-ready (admission); the node lifecycle
        # controller, which we do not run, lifts it once the node reports Ready.
        self._set_ready(name, True)
        self._kick()
        return name

    @staticmethod
    def _condition(ready: bool) -> dict[str, Any]:
        return {
            "type": "Ready",
            "status": "True" if ready else "False",
            "reason": "KubeletReady" if ready else "NodeStatusUnknown",
            "lastHeartbeatTime": _now(),
            "lastTransitionTime": _now(),
        }

    def _set_ready(self, name: str, ready: bool) -> None:
        with self.lock:
            self.ready[name] = ready
        self.client.request(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            body={"status": {"conditions": [self._condition(ready)]}},
            content_type="application/strategic-merge-patch+json",
        )
        # What the node lifecycle controller does to a node that stopped answering (we do not
        # run it: no kubelet heartbeats): taint it, so the scheduler places nothing new there.
        taints = [] if ready else [{"key": UNREACHABLE, "effect": e} for e in UNREACHABLE_EFFECTS]
        self.client.request(
            "PATCH", f"/api/v1/nodes/{name}", body={"spec": {"taints": taints}}, content_type=MERGE
        )

    def node_not_ready(self, name: str) -> None:
        """The node stops answering: NotReady and tainted unreachable; its pods stay as they
        are (those being deleted stay Terminating), and their agents answer no more."""
        with self.lock:
            gone = [p for p, node in self.agent_nodes.items() if node == name and p in self.agents]
            doubles = [self.agents.pop(p) for p in gone]
        for double in doubles:
            double.close()
        self._set_ready(name, False)

    def node_back(self, name: str) -> None:
        self._set_ready(name, True)
        self._kick()

    def ready_nodes(self) -> list[str]:
        with self.lock:
            return sorted(n for n, ready in self.ready.items() if ready)

    def remove_nodes(self) -> None:
        for name in list(self.ready):
            with contextlib.suppress(ApiError):
                self.client.request("DELETE", f"/api/v1/nodes/{name}")
        with self.lock:
            self.ready.clear()

    # -- objects -----------------------------------------------------------------------------
    def objects(self, resource: str, *, selector: str | None = None) -> list[dict[str, Any]]:
        """The objects of a resource in this namespace (all, for cluster-scoped ones), sorted
        by name."""
        prefix, namespaced = RESOURCES[resource]
        path = (
            f"{prefix}/namespaces/{self.namespace}/{resource}"
            if namespaced
            else f"{prefix}/{resource}"
        )
        listed = self.client.request(
            "GET", path, query={"labelSelector": selector} if selector else None
        )
        return sorted(listed.get("items") or [], key=lambda o: o["metadata"]["name"])

    def pods(self, role: str | None = None) -> list[dict[str, Any]]:
        return self.objects("pods", selector=f"{ROLE}={role}" if role else None)

    def pod(self, name: str) -> dict[str, Any]:
        path = f"/api/v1/namespaces/{self.namespace}/pods/{name}"
        pod: dict[str, Any] = self.client.request("GET", path)
        return pod

    def ready_as(self, name: str, ready: bool) -> None:
        """What the kubelet writes when a pod's readiness probe changes its answer."""
        pod = self.pod(name)
        status = pod.get("status") or {}
        kept = [
            c
            for c in status.get("conditions") or []
            if c.get("type") not in ("Ready", "ContainersReady")
        ]
        flag = "True" if ready else "False"
        conditions = [
            *kept,
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag},
        ]
        self._status(name, {"conditions": conditions})

    def attempts(self) -> dict[int, list[str]]:
        """The worker pods running each attempt: Running, not being deleted, labelled with it,
        and where a pod runs an agent, its agent running it (an order relabels a pod before
        it reaches the agent)."""
        found: dict[int, list[str]] = {}
        for pod in self.pods("worker"):
            name, labels = pod["metadata"]["name"], pod["metadata"]["labels"]
            number = int(labels.get("pretrain.dev/attempt", "0"))
            if pod.get("status", {}).get("phase") != "Running":
                continue
            if pod["metadata"].get("deletionTimestamp"):
                continue
            with self.lock:
                agent = self.agents.get(name)
            if runs_agent(pod) and (
                agent is None or agent.state().attempt != number or not agent.state().running
            ):
                continue
            found.setdefault(number, []).append(name)
        return {n: sorted(names) for n, names in found.items()}

    def attempt(self, number: int, size: int = 2) -> list[str]:
        """The running workers of attempt ``number`` once there are ``size`` of them, else []."""
        names = self.attempts().get(number, [])
        return names if len(names) == size else []

    def _status(self, name: str, status: dict[str, Any]) -> None:
        self.client.request(
            "PATCH",
            f"/api/v1/namespaces/{self.namespace}/pods/{name}/status",
            body={"status": status},
            content_type=MERGE,
        )

    def finish(
        self,
        name: str,
        *,
        exit_code: int,
        report: dict[str, Any] | None = None,
        message: str | None = None,
    ) -> None:
        """The trainer in pod ``name`` exits, leaving ``report`` (or ``message``) as its
        termination message (or with its agent, which reports it and stays)."""
        with self.lock:
            double = self.agents.get(name)
        if double is not None:
            double.end(exit_code=exit_code, report=report)
            return
        pod = self.pod(name)
        terminated: dict[str, Any] = {
            "exitCode": exit_code,
            "reason": "Completed" if exit_code == 0 else "Error",
            "startedAt": _now(),
            "finishedAt": _now(),
        }
        if report is not None or message is not None:
            terminated["message"] = json.dumps(report) if report is not None else message
        self._status(
            name,
            {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [
                    self._container(pod, ready=False, state={"terminated": terminated})
                ],
            },
        )

    @staticmethod
    def _container(pod: dict[str, Any], *, ready: bool, state: dict[str, Any]) -> dict[str, Any]:
        image = pod["spec"]["containers"][0]["image"]
        return {
            "name": pod["spec"]["containers"][0]["name"],
            "image": image,
            "imageID": f"docker-pullable://{image}",
            "ready": ready,
            "restartCount": 0,
            "state": state,
        }

    # -- the kubelet at work -----------------------------------------------------------------
    def _serve(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        node = spec.get("nodeName")
        with self.lock:
            if not self.ready.get(node or ""):
                return  # not bound, not ours, or its node is down
        phase = (pod.get("status") or {}).get("phase")
        self.bound_at.setdefault(meta["uid"], time.monotonic())
        if meta.get("deletionTimestamp"):
            self._call(lambda: self._terminate(pod))
        elif phase == "Pending" and meta["uid"] not in self._running:
            self._running.add(meta["uid"])
            status = {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": self.pod_ip(pod),
                "podIPs": [{"ip": self.pod_ip(pod)}],
                "startTime": _now(),
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                "containerStatuses": [
                    self._container(pod, ready=True, state={"running": {"startedAt": _now()}})
                ],
            }

            def run() -> None:
                self._status(meta["name"], status)
                self.running_at[meta["uid"]] = time.monotonic()
                self._start(pod)

            self._call(run)

    def pod_ip(self, pod: dict[str, Any]) -> str:
        """The address a pod gets: this machine's, or for a worker agent's pod one of its own
        on the loopback network (127.0.0.0/8 is all local), where its agent listens."""
        if not runs_agent(pod):
            return "127.0.0.1"
        uid = pod["metadata"]["uid"]
        with self.lock:
            if uid not in self._addresses:
                n = next(_ADDRESSES)
                self._addresses[uid] = (
                    f"127.{os.getpid() % 200 + 20}.{n // 250 % 250}.{n % 250 + 2}"
                )
            return self._addresses[uid]

    def _start(self, pod: dict[str, Any]) -> None:
        """The pod's containers start: nothing runs in them, but a worker agent's pod answers
        as its agent would (:class:`AgentDouble`)."""
        if runs_agent(pod):
            name = pod["metadata"]["name"]
            double = AgentDouble(
                self.pod_ip(pod),
                on_ready=lambda ready: self._call(lambda: self.ready_as(name, ready)),
            )
            with self.lock:
                self.agents[pod["metadata"]["name"]] = double
                self.agent_nodes[pod["metadata"]["name"]] = pod["spec"]["nodeName"]

    def _terminate(self, pod: dict[str, Any]) -> None:
        """A pod being deleted: its container exits at once on SIGTERM; confirm the deletion."""
        with self.lock:
            double = self.agents.pop(pod["metadata"]["name"], None)
        if double is not None:
            double.close()
        meta = pod["metadata"]
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        self._core.delete_namespaced_pod(meta["name"], self.namespace, body=body)

    def _call(self, action: Callable[[], Any]) -> None:
        def run() -> None:
            with contextlib.suppress(ApiError, kubernetes.client.ApiException):
                action()  # or the pod was deleted meanwhile: nothing to do

        self._pool.submit(run)

    def _kick(self) -> None:
        """Pods already bound to a node that just became ready are served on the next list."""
        self._relist = True

    _relist = False

    def _loop(self) -> None:
        watch = kubernetes.watch.Watch()
        version = ""
        while not self._stop.is_set():
            try:
                if not version or self._relist:
                    self._relist = False
                    listed = self._core.list_namespaced_pod(self.namespace, _preload_content=False)
                    body = json.loads(listed.data)
                    version = body["metadata"]["resourceVersion"]
                    for pod in body.get("items") or []:
                        self._serve(pod)
                for event in watch.stream(
                    self._core.list_namespaced_pod,
                    self.namespace,
                    resource_version=version,
                    timeout_seconds=1,
                    allow_watch_bookmarks=True,
                ):
                    raw = event["raw_object"]
                    version = raw["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._serve(raw)
                    if self._stop.is_set() or self._relist:
                        break
            except kubernetes.client.ApiException as error:
                if error.status == 410:
                    version = ""  # too old: list again
                else:
                    time.sleep(0.2)
            except Exception:  # the API server restarting: try again
                version = ""
                time.sleep(0.2)

    def __enter__(self) -> Kubelet:
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=True)
        with self.lock:
            doubles = list(self.agents.values())
            self.agents.clear()
        for double in doubles:
            double.close()

    # -- for failing tests -------------------------------------------------------------------
    def describe(self) -> str:
        """Pods, job status and events: what a failed test should show."""
        pods = [
            (p["metadata"]["name"], p["spec"].get("nodeName"), (p.get("status") or {}).get("phase"))
            for p in self.pods()
        ]
        jobs = [(j["metadata"]["name"], j.get("status")) for j in self.objects("pretrainjobs")]
        events = [(e["reason"], e["message"]) for e in self.objects("events")]
        return f"pods: {pods}\njobs: {jobs}\nevents: {events}"

    def eventually(self, check: Callable[[], Any], *, timeout: float = 30.0, what: str = "") -> Any:
        try:
            return eventually(check, timeout=timeout, what=what)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.describe()}") from None


def runs_agent(pod: dict[str, Any]) -> bool:
    """Whether the pod's main process is the worker agent."""
    return "pretrain_trainer.agent" in pod["spec"]["containers"][0]["command"]


class AgentDouble:
    """What answers as a worker agent in a pod of this kubelet, where no trainer runs: the
    agent's own HTTP interface (``pretrain_trainer.agent.http_handler``) over an attempt that
    runs until a test ends it or it is stopped. The same order again changes nothing; an older
    one is refused (409), as by the agent."""

    def __init__(self, host: str, *, on_ready: Callable[[bool], None]) -> None:
        """``on_ready`` hears what its pod's readiness probe would say, when that changes."""
        self.on_ready = on_ready
        self.identity = f"double-{host}"
        self.order: contract.AttemptOrder | None = None
        self.state_now = contract.AgentState(agent=self.identity)
        self.orders: list[contract.AttemptOrder] = []  # every order it started
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, contract.AGENT_PORT), http_handler(self))
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def end(self, *, exit_code: int, report: dict[str, Any] | None = None) -> None:
        """Its attempt's trainers exit."""
        with self.lock:
            if not self.state_now.running:
                return
            self.state_now = self.state_now.model_copy(
                update={
                    "running": False,
                    "exit_code": exit_code,
                    "ended_at": time.time(),
                    "report": json.dumps(report) if report is not None else None,
                }
            )
        self.on_ready(False)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what the agent's HTTP interface calls (pretrain_trainer.agent.http_handler) --
    def state(self) -> contract.AgentState:
        with self.lock:
            return self.state_now

    def run(self, order: contract.AttemptOrder) -> contract.AgentState:
        with self.lock:
            if self.order is not None and order.attempt < self.order.attempt:
                raise ValueError(f"attempt {order.attempt} is older than {self.order.attempt}")
            if order == self.order:
                return self.state_now
            ended = self.state_now.exit_code is not None
            self.order = order
            self.orders.append(order)
            self.state_now = contract.AgentState(
                agent=self.identity,
                attempt=order.attempt,
                stage=order.stage,
                running=True,
                started_at=time.time(),
            )
            answer = self.state_now
        if ended:
            self.on_ready(True)
        return answer

    def stop(self, attempt: int, *, grace: float) -> contract.AgentState:
        del grace  # nothing runs here to save
        if self.state().attempt == attempt:
            self.end(exit_code=143)  # SIGTERM: the trainer stops
        return self.state()


def names(objects: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(o["metadata"]["name"] for o in objects)
