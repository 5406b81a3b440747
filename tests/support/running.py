"""A test kubelet whose pods really run: the rendezvous store and the trainers (under torchrun,
or under the worker agent that a pod outliving attempts runs), as processes on this machine,
started from each pod's own command and environment.

What a node would provide is mapped onto this machine: the pod's run config comes from its
ConfigMap (written to a file), the rendezvous service's address is the local store's, the
termination message is a file read when the container exits (or, for a failed export, its
log's last lines), and rank 0 serves its metrics on the port the operator scrapes at the pod's
IP (127.0.0.1); other ranks pick a free port. An export pod runs the trainer's export. A
pod that is deleted gets SIGTERM, then SIGKILL after its grace period, and its deletion is
confirmed once its processes are gone. A node that stops answering takes its pods' processes
with it (SIGKILL), as a machine that dies does, while its pods stay as they were.

An agent's pod gets an address of its own on the loopback network (127.x.y.z), where its agent
and its trainers' metrics listen, and its in-memory tier a directory on /dev/shm that goes
when the pod does or its node dies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from pretrain_operator.kube.objects import RANK, ROLE
from pretrain_trainer import contract
from pretrain_trainer.lifetime import die_with_parent

from tests.support.controlplane import ControlPlane
from tests.support.kubelet import Kubelet

LOG_TAIL_LINES = 80  # what a kubelet keeps of a failed container's log as its message


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RunningKubelet(Kubelet):
    def __init__(self, plane: ControlPlane, namespace: str, *, workdir: Path, **kw: Any) -> None:
        self.workdir = workdir
        self.rendezvous_port = free_port()
        self.metrics_port = free_port()  # rank 0's, where the operator reads it
        self.step_log = workdir / "steps.jsonl"  # for the test: not read by the operator
        self.processes: dict[str, subprocess.Popen[bytes]] = {}  # pod name -> its container
        self.nodes_of: dict[str, str] = {}  # pod name -> node
        self.uids: dict[str, str] = {}  # pod name -> the uid of the pod its container is
        self.killed_at: dict[str, float] = {}  # pod name -> when its node took it down
        self._leaving: set[str] = set()  # uids of pods being deleted
        self._gone: set[subprocess.Popen[bytes]] = set()  # containers killed or stopped by us
        self.started: list[tuple[str, str, float]] = []  # worker pods started: name, uid, when
        self.memory = Path("/dev/shm" if Path("/dev/shm").is_dir() else workdir) / (
            f"pretrain-kubelet-{os.getpid()}-{free_port()}"
        )
        super().__init__(plane, namespace, **kw)

    # -- containers --------------------------------------------------------------------------
    def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        role, name = meta["labels"].get(ROLE), meta["name"]
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
        if role == "rendezvous":
            command = [sys.executable, "-m", "pretrain_trainer.rendezvous"]
            command.append(f"--port={self.rendezvous_port}")
        elif role == "worker":
            folder = self.workdir / "pods" / name
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "run.yaml"
            config.write_text(self._run_config(pod))
            env |= {
                contract.ENV_RUN_CONFIG: str(config),
                contract.ENV_STEP_LOG: str(self.step_log),
            }
            if "pretrain_trainer.agent" in container["command"]:
                command = [sys.executable, *self._agent_args(container, folder)]
                env |= {
                    contract.ENV_LISTEN_HOST: self.pod_ip(pod),
                    contract.ENV_STORE: f"127.0.0.1:{self.rendezvous_port}",
                    contract.ENV_MEMORY_ROOT: str(self.memory / name),
                    contract.ENV_METRICS_PORT: str(self.metrics_port),
                }
            else:
                command = [sys.executable, "-m", "torch.distributed.run", *self._args(container)]
                env |= {
                    contract.ENV_REPORT_PATH: str(folder / "report.json"),
                    contract.ENV_METRICS_PORT: str(
                        self.metrics_port if meta["labels"].get(RANK) == "0" else 0
                    ),
                }
            with self.lock:
                self.started.append((name, meta["uid"], time.time()))
        elif role == "export":
            command = [sys.executable, *container["command"][1:]]  # after "python"
        else:
            return  # a standby sleeps: nothing to run
        log = (self.workdir / f"{name}.log").open("ab")
        popen = subprocess.Popen(
            command,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a test killed half-way leaves no pod's process
        )
        log.close()
        with self.lock:
            self.processes[name] = popen
            self.uids[name] = meta["uid"]
            self.nodes_of[name] = pod["spec"]["nodeName"]
        threading.Thread(target=self._exited, args=(name, popen), daemon=True).start()
        if "pretrain_trainer.agent" in container["command"]:
            threading.Thread(target=self._probe, args=(pod, popen), daemon=True).start()

    def _args(self, container: dict[str, Any]) -> list[str]:
        endpoint = f"--rdzv-endpoint=127.0.0.1:{self.rendezvous_port}"
        args = container["command"][1:]  # after "torchrun"
        return [endpoint if a.startswith("--rdzv-endpoint=") else a for a in args]

    def _probe(self, pod: dict[str, Any], popen: subprocess.Popen[bytes]) -> None:
        """The pod's readiness probe (``GET /ready`` on its agent), every half second while it
        runs; a changed answer is written to the pod, as a kubelet does."""
        name = pod["metadata"]["name"]
        url = f"http://{self.pod_ip(pod)}:{contract.AGENT_PORT}/ready"
        was: bool | None = None
        while True:
            with self.lock:
                if popen in self._gone or popen.poll() is not None:
                    return  # the container ended (a pod of the same name may follow)
            try:
                with urllib.request.urlopen(url, timeout=1.0) as response:
                    ready = response.status == 200
            except (OSError, ValueError):
                ready = False
            if ready != was:
                with contextlib.suppress(Exception):
                    self.ready_as(name, ready)
                was = ready
            time.sleep(0.5)

    @staticmethod
    def _agent_args(container: dict[str, Any], folder: Path) -> list[str]:
        """``python -m pretrain_trainer.agent ...``, its attempts kept in the pod's folder."""
        args = container["command"][1:]  # after "python"
        return [f"--dir={folder}" if a.startswith("--dir=") else a for a in args]

    def _run_config(self, pod: dict[str, Any]) -> str:
        """The run config the pod mounts, from its ConfigMap volume."""
        volume = next(v for v in pod["spec"]["volumes"] if "configMap" in v)
        path = f"/api/v1/namespaces/{self.namespace}/configmaps/{volume['configMap']['name']}"
        data: dict[str, str] = self.client.request("GET", path)["data"]
        return data["run.yaml"]

    def _exited(self, name: str, popen: subprocess.Popen[bytes]) -> None:
        """When the container's process ends by itself, the pod ends: Succeeded or Failed,
        with the trainer's report as its termination message."""
        code = popen.wait()
        with self.lock:
            if popen in self._gone:
                return  # deleted, or its node is gone: no kubelet reports it
        report = contract.read_report(self.workdir / "pods" / name / "report.json")
        exit_code = code if code >= 0 else 128 - code
        payload = report.model_dump(mode="json", by_alias=True) if report else None
        message = None
        if payload is None and exit_code:  # terminationMessagePolicy FallbackToLogsOnError
            log = (self.workdir / f"{name}.log").read_text(errors="replace")
            message = "\n".join(log.splitlines()[-LOG_TAIL_LINES:])
        with contextlib.suppress(Exception):
            self.finish(name, exit_code=exit_code, report=payload, message=message)

    def _terminate(self, pod: dict[str, Any]) -> None:
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        with self.lock:
            if uid in self._leaving:
                return
            self._leaving.add(uid)
            popen = self.processes.get(name) if self.uids.get(name) == uid else None
            if popen is not None:
                self._gone.add(popen)
        if popen is not None and popen.poll() is None:
            _signal(popen, signal.SIGTERM)
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal(popen, signal.SIGKILL)
                popen.wait()
        shutil.rmtree(self.memory / name, ignore_errors=True)
        super()._terminate(pod)

    # -- nodes and processes going away ------------------------------------------------------
    def node_not_ready(self, name: str) -> None:
        """The machine dies: its pods' processes with it; the node stops answering."""
        with self.lock:
            doomed = [(p, self.processes[p]) for p, n in self.nodes_of.items() if n == name]
        for pod, popen in doomed:
            self.killed_at[pod] = time.time()
            with self.lock:
                self._gone.add(popen)
            _signal(popen, signal.SIGKILL)
            shutil.rmtree(self.memory / pod, ignore_errors=True)  # the machine's memory
        super().node_not_ready(name)

    def kill(self, pod: str) -> float:
        """SIGKILL a pod's processes (its trainer crashed); returns when."""
        with self.lock:
            popen = self.processes[pod]
        when = time.time()
        _signal(popen, signal.SIGKILL)
        return when

    def __exit__(self, *exc_info: object) -> None:
        with self.lock:
            running = list(self.processes.values())
        for popen in running:
            _signal(popen, signal.SIGKILL)
        for popen in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=10)
        shutil.rmtree(self.memory, ignore_errors=True)
        super().__exit__(*exc_info)


def _signal(popen: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)
