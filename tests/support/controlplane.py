"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-scheduler and
kube-controller-manager, each its own process of the ``controlplane`` binary that
``tests/controlplane`` builds (``make controlplane``).

Configured like a kubeadm cluster, less the kubelets (the tests play those, ``kubelet.py``):
TLS with a CA, client certificates for the admin and the components, ``Node,RBAC``
authorization, service-account tokens signed by their own key, the PodSecurity admission
plugin, and an audit log of every request (who, verb, resource, status code) that the tests
read as the record of what a client did. The controller manager runs only what a cluster
without kubelets needs: garbage collection, namespaces, service accounts and their tokens,
the root CA publisher, role aggregation, pod garbage collection, Deployments and ReplicaSets,
and the binding of PersistentVolumeClaims to volumes (no node lifecycle controller: no kubelet
heartbeats).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from tests.conftest import ROOT

BINARY = ROOT / ".tools" / "bin" / "controlplane"
KUBECTL = ROOT / ".tools" / "bin" / "kubectl"
VERSION = "v1.37.2"
CONTROLLERS = [
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "pod-garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "persistentvolume-binder-controller",
]
# One scheduler, no leader election (it starts at once); the client rate of a large cluster
# (the default, 50 requests/s, binds 1,000 pods in 20 s).
SCHEDULER_CONFIG = """\
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
  qps: 500
  burst: 1000
leaderElection:
  leaderElect: false
"""
RBAC_WARMUP_SECONDS = 10.0
AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: Metadata
"""


def unavailable() -> str | None:
    """Why the control plane cannot run here, or None."""
    if not os.access(BINARY, os.X_OK):
        built = BINARY.relative_to(ROOT)
        return f"no control plane: {built} is not built (it needs go >= 1.26: make controlplane)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    _out: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._out = self.log.open("ab")
        self.popen = subprocess.Popen(
            [str(BINARY), self.name, *self.args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, *, timeout: float = 20.0, kill: bool = False) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._out is not None:
            self._out.close()
        self.popen = None

    def check(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


class ControlPlane:
    """Start with ``with ControlPlane(directory) as plane:``; everything it writes (PKI, etcd
    data, logs, the audit log) stays under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pki = directory / "pki"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.audit_log = directory / "audit.log"
        etcd_port, peer_port = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_port}"
        pki = self.pki
        self.etcd = Process(
            "etcd",
            [
                f"--data-dir={directory / 'etcd'}",
                f"--client-port={etcd_port}",
                f"--peer-port={peer_port}",
            ],
            directory / "etcd.log",
        )
        (directory / "audit-policy.yaml").write_text(AUDIT_POLICY)
        self.apiserver = Process(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The kubernetes Service's endpoints may not be a loopback address; nothing in
                # this cluster reaches the API server through that Service.
                "--endpoint-reconciler-type=none",
                f"--secure-port={self.port}",
                f"--cert-dir={directory / 'serving'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                # As kubeadm sets it (the components read it back for their own serving).
                f"--requestheader-client-ca-file={pki / 'ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                "--authorization-mode=Node,RBAC",
                # What kubeadm enables, and the check that a client may block its objects'
                # owners' deletion (OpenShift enables it): update on the owner's finalizers.
                "--enable-admission-plugins=NodeRestriction,PodSecurity,Priority,"
                "OwnerReferencesPermissionEnforcement",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--audit-policy-file={directory / 'audit-policy.yaml'}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--profiling=false",
                "--v=1",
            ],
            directory / "kube-apiserver.log",
        )
        scheduler_config = directory / "scheduler.yaml"
        scheduler_config.write_text(
            SCHEDULER_CONFIG.format(kubeconfig=pki / "scheduler.kubeconfig")
        )
        self.scheduler = Process(
            "kube-scheduler",
            [
                f"--config={scheduler_config}",
                *self._component("scheduler")[1:],  # the kubeconfig is in the config
                f"--secure-port={free_port()}",
            ],
            directory / "kube-scheduler.log",
        )
        self.controller_manager = Process(
            "kube-controller-manager",
            [
                *self._component("controller-manager"),
                f"--secure-port={free_port()}",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=true",
                "--leader-elect=false",
                # What a large cluster sets: the garbage collector deletes 1,000 pods quickly.
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
            ],
            directory / "kube-controller-manager.log",
        )
        self.processes = [self.etcd, self.apiserver, self.scheduler, self.controller_manager]
        self.restarts: list[tuple[float, float]] = []

    def _component(self, name: str) -> list[str]:
        config = self.pki / f"{name}.kubeconfig"
        return [
            f"--kubeconfig={config}",
            f"--authentication-kubeconfig={config}",
            f"--authorization-kubeconfig={config}",
            "--bind-address=127.0.0.1",
            "--v=1",
        ]

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> ControlPlane:
        subprocess.run(
            [str(BINARY), "pki", f"--dir={self.pki}", f"--server={self.url}"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        try:
            self.etcd.start()
            self.start_apiserver()
            self.scheduler.start()
            self.controller_manager.start()
            self._wait_for_default_service_account()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in reversed(self.processes):
            process.stop()

    def start_apiserver(self, *, timeout: float = 90.0) -> None:
        self.apiserver.start()
        deadline = time.monotonic() + timeout
        while not self._ready():
            self.etcd.check()
            self.apiserver.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"kube-apiserver not ready in {timeout:.0f}s ({self.dir})")
            time.sleep(0.2)

    def restart_apiserver(self, *, compact: bool = False) -> None:
        """The API server crashes (SIGKILL) and starts again on the same etcd and port; with
        ``compact``, etcd's history is compacted while it is down, so every watch resumed from
        a resourceVersion older than the newest gets 410 Gone. Just after it is ready its
        authorizer may still be loading the RBAC objects, refusing requests it will grant a
        moment later: :attr:`restarts` keeps when each restart began and when that may still
        happen (wall-clock seconds)."""
        began = time.time()
        self.apiserver.stop(kill=True)
        if compact:
            self.compact()
        self.start_apiserver()
        self.restarts.append((began, time.time() + RBAC_WARMUP_SECONDS))

    def compact(self) -> int:
        """Compact etcd's history up to its current revision (through etcd's JSON gateway);
        returns that revision."""

        def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
            request = urllib.request.Request(
                f"{self.etcd_url}{path}", data=json.dumps(body).encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer

        revision = int(call("/v3/kv/range", {"key": "Lw=="})["header"]["revision"])  # key "/"
        call("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def _ready(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", context=context, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def _wait_for_default_service_account(self, timeout: float = 60.0) -> None:
        """The service-account controller runs once ``default`` has its account: pods can be
        created from then on."""
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                process.check()
            done = self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no default service account in {timeout:.0f}s: {done.stderr}")
            time.sleep(0.3)

    # -- clients -------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (``system:masters``)."""
        return self.pki / "admin.kubeconfig"

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self.run(KUBECTL, *args, check=check, input=input, kubeconfig=kubeconfig)

    def run(
        self,
        tool: Path | str,
        *args: str,
        check: bool = True,
        input: str | None = None,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run a client binary (kubectl, helm) against this server, as the admin by default;
        with ``check``, a failure raises with its output."""
        done = subprocess.run(
            [str(tool), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            name = Path(tool).name
            raise AssertionError(f"{name} {' '.join(args)}: {done.stdout}{done.stderr}")
        return done

    def client(self, token: str | None = None) -> Any:
        """A ``kubernetes.client.ApiClient``: as the admin, or as the bearer of ``token``."""
        import kubernetes

        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.ca)
        if token is None:
            loader = kubernetes.config.kube_config.KubeConfigLoader(
                config_dict=_load_yaml(self.kubeconfig),
                config_base_path=str(self.pki),
            )
            loader.load_and_set(configuration)
        else:
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return kubernetes.client.ApiClient(configuration)

    def token(self, namespace: str, service_account: str, *, hours: int = 6) -> str:
        """A token for a service account, from the TokenRequest API (what a pod would mount)."""
        done = self.kubectl(
            "create", "token", service_account, "-n", namespace, f"--duration={hours}h"
        )
        return done.stdout.strip()

    def kubeconfig_for(self, token: str, path: Path, *, namespace: str = "default") -> Path:
        """A kubeconfig that authenticates with ``token``."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca)},
                }
            ],
            "users": [{"name": "bearer", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": "bearer", "namespace": namespace},
                }
            ],
            "current-context": "test",
        }
        path.write_text(json.dumps(config))
        return path

    def connection_info(self, token: str, *, namespace: str = "default") -> Any:
        """What a ``@kopf.on.login()`` handler returns to reach this server as ``token``."""
        import kopf

        return kopf.ConnectionInfo(
            server=self.url, ca_path=str(self.ca), token=token, default_namespace=namespace
        )

    # -- the audit log -------------------------------------------------------------------------
    def audit(self, *, since: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Audit events written after byte ``since`` of the log, and the offset to read on from."""
        with self.audit_log.open("rb") as log:
            log.seek(since)
            data = log.read()
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return events, since + end

    def restarting(self, event: dict[str, Any]) -> bool:
        """Whether an audit event falls while the API server restarted (see
        :meth:`restart_apiserver`)."""
        stamp = event.get("stageTimestamp") or event.get("requestReceivedTimestamp") or ""
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        return any(began <= when <= until for began, until in self.restarts)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict[str, Any]]]:
        """The audit events of the requests made inside the block (filled in at its end)."""
        _, start = self.audit()
        events: list[dict[str, Any]] = []
        yield events
        time.sleep(0.2)  # the last responses reach the log
        events.extend(self.audit(since=start)[0])


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    loaded = yaml.safe_load(path.read_text())
    assert isinstance(loaded, dict)
    return loaded


def have_go() -> bool:
    return shutil.which("go") is not None
