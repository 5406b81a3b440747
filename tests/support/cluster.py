"""A pretend cluster around the test API server: nodes, a scheduler and kubelets.

The tests play the kubelet by writing pod status through the API, as a real one does: a loop
binds each Pending pod to a free Ready node (one worker-sized pod per node; the rendezvous pod
fits anywhere) and marks it Running; tests make pods fail or finish with a termination message
(the trainer's report), take nodes down and add new ones.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from pretrain_operator.kube.client import KubeClient

from tests.support.kube.apiserver import ApiServer

ROLE = "pretrain.dev/role"


def eventually(check: Callable[[], Any], *, timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not in {timeout:.0f}s: {what or check}")
        time.sleep(0.05)


class Cluster:
    def __init__(self, server: ApiServer, *, nodes: int, namespace: str = "default") -> None:
        self.server, self.namespace = server, namespace
        # The kubelets and the test: its requests are not the operator's.
        self.client = KubeClient(server.client(), field_manager="kubelet")
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for _ in range(nodes):
            self.add_node()

    # -- nodes -------------------------------------------------------------------------------
    def add_node(self) -> str:
        with self.lock:
            name = f"node-{len(self.server.objects('nodes'))}"
            node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
            self.client.request("POST", "/api/v1/nodes", body=node)
            self._node_ready(name, True)
            return name

    def _node_ready(self, name: str, ready: bool) -> None:
        condition = {"type": "Ready", "status": "True" if ready else "False"}
        self.client.request(
            "PATCH",
            f"/api/v1/nodes/{name}/status",
            body={"status": {"conditions": [condition]}},
            content_type="application/merge-patch+json",
        )

    def node_not_ready(self, name: str) -> None:
        with self.lock:
            self._node_ready(name, False)

    def ready_nodes(self) -> list[str]:
        return [
            n["metadata"]["name"]
            for n in self.server.objects("nodes")
            if any(c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        ]

    # -- pods --------------------------------------------------------------------------------
    def pods(self, role: str | None = None) -> list[dict[str, Any]]:
        pods = self.server.objects("pods", self.namespace)
        return [p for p in pods if role is None or p["metadata"]["labels"].get(ROLE) == role]

    def pod(self, name: str) -> dict[str, Any]:
        return next(p for p in self.pods() if p["metadata"]["name"] == name)

    def _status(self, name: str, status: dict[str, Any]) -> None:
        self.client.request(
            "PATCH",
            f"/api/v1/namespaces/{self.namespace}/pods/{name}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
        )

    def schedule(self) -> None:
        """One pass of scheduler and kubelets."""
        with self.lock:
            ready = self.ready_nodes()
            pods = self.pods()
            taken = {
                p["spec"].get("nodeName")
                for p in pods
                if p["metadata"]["labels"].get(ROLE) != "rendezvous"
                and p.get("status", {}).get("phase") in ("Pending", "Running", None)
                and p["spec"].get("nodeName")
            }
            free = [n for n in ready if n not in taken]
            for pod in pods:
                name, spec = pod["metadata"]["name"], pod["spec"]
                if spec.get("nodeName") or pod.get("status", {}).get("phase") not in (
                    None,
                    "Pending",
                ):
                    continue
                if pod["metadata"]["labels"].get(ROLE) == "rendezvous":
                    node = ready[0] if ready else None
                else:
                    node = free.pop(0) if free else None
                if node is None and pod["metadata"]["labels"].get(ROLE) == "worker":
                    self._preempt_standby(pods)  # its node is free on the next pass
                if node is None:
                    continue
                self.client.request(
                    "PATCH",
                    f"/api/v1/namespaces/{self.namespace}/pods/{name}",
                    body={"spec": {"nodeName": node}},
                    content_type="application/merge-patch+json",
                )
                self._status(
                    name,
                    {
                        "phase": "Running",
                        "podIP": "127.0.0.1",
                        "containerStatuses": [
                            {"name": "trainer", "ready": True, "state": {"running": {}}}
                        ],
                    },
                )

    def _preempt_standby(self, pods: list[dict[str, Any]]) -> None:
        """What the scheduler does for a pending pod of higher priority: delete a running
        standby of a lower PriorityClass (standbys without one are not preemptible)."""
        for pod in pods:
            if (
                pod["metadata"]["labels"].get(ROLE) == "standby"
                and pod["spec"].get("priorityClassName")
                and pod.get("status", {}).get("phase") == "Running"
                and not pod["metadata"].get("deletionTimestamp")
            ):
                name = pod["metadata"]["name"]
                self.client.delete("Pod", name, namespace=self.namespace, grace_seconds=0)
                pods.remove(pod)
                return

    def finish(self, name: str, *, exit_code: int, report: dict[str, Any] | None = None) -> None:
        """The trainer in pod ``name`` exits, leaving ``report`` as its termination message."""
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": "Completed"}
        if report is not None:
            terminated["message"] = json.dumps(report)
        with self.lock:
            self._status(
                name,
                {
                    "phase": "Succeeded" if exit_code == 0 else "Failed",
                    "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
                },
            )

    def describe(self) -> str:
        """Pods, job status and events: what a failed test should show."""
        pods = [
            (p["metadata"]["name"], p["spec"].get("nodeName"), p.get("status", {}).get("phase"))
            for p in self.pods()
        ]
        jobs = [
            (j["metadata"]["name"], j.get("status")) for j in self.server.objects("pretrainjobs")
        ]
        events = [(e["reason"], e["message"]) for e in self.server.objects("events")]
        return f"pods: {pods}\njobs: {jobs}\nevents: {events}"

    def eventually(self, check: Callable[[], Any], *, timeout: float = 20.0, what: str = "") -> Any:
        try:
            return eventually(check, timeout=timeout, what=what)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\n{self.describe()}") from None

    # -- the kubelet loop --------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        def loop() -> None:
            while not self._stop.wait(0.05):
                try:
                    self.schedule()
                except Exception:  # a pod deleted between list and patch: next pass
                    continue

        self._thread = threading.Thread(target=loop, name="kubelet", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
