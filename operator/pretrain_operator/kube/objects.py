"""Pure builders of the Kubernetes objects a PretrainJob owns (docs/design.md, "How a job runs").

Per job: a headless Service (stable DNS for the rendezvous store and the workers), a ConfigMap
with the rendered run config, a ServiceAccount with no API rights, and the rendezvous pod that
hosts the c10d store. Per slot: either the worker pod of the current attempt
(``<job>-a<attempt>-w<slot>``) or a *standby* pod (``<job>-standby-w<slot>``) that asks the
scheduler for a worker's resources and sleeps: when it runs, capacity for one more worker
exists, which is how the group grows back after a node returns. After the last stage, a job
with spec.export runs one export pod per try (``<job>-export-<try>``). Names are deterministic,
so a create that races another (or a restarted operator) meets 409 and changes nothing.

No API calls here, no kubernetes import: plain dicts, tested as data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pretrain_trainer import contract

from ..api import API_VERSION, KIND, PretrainJob
from ..plan import ExportTask, Group

PREFIX = "pretrain.dev"
JOB = f"{PREFIX}/job"
ROLE = f"{PREFIX}/role"
STAGE = f"{PREFIX}/stage"
ATTEMPT = f"{PREFIX}/attempt"
SLOT = f"{PREFIX}/slot"
RANK = f"{PREFIX}/rank"
WORKER, STANDBY, RENDEZVOUS, EXPORT = "worker", "standby", "rendezvous", "export"


class PodPhase(StrEnum):
    """A pod's ``status.phase``, as the kubelet writes it."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @classmethod
    def of(cls, pod: Mapping[str, Any] | None) -> PodPhase | None:
        phase = None if pod is None else pod.get("status", {}).get("phase")
        return cls(phase) if isinstance(phase, str) and phase in cls._value2member_map_ else None


FINISHED = (PodPhase.SUCCEEDED, PodPhase.FAILED)
ALIVE = (PodPhase.PENDING, PodPhase.RUNNING)

CONTAINER = "trainer"
METRICS_PORT_NAME = "metrics"
CONFIG_DIR = "/etc/pretrain"
MEMORY_DIR = "/var/lib/pretrain/memory"  # a worker pod's in-memory checkpoint tier
ATTEMPTS_DIR = "/var/lib/pretrain/attempts"  # the agent's attempt logs and reports
AGENT_PORT_NAME = "agent"
READINESS_PERIOD_SECONDS = 2
TORCHRUN_SHUTDOWN_SECONDS = 30  # torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT default
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_COUNT_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
COSCHEDULING_GROUP_LABEL = "scheduling.x-k8s.io/pod-group"


@dataclass(frozen=True)
class Gang:
    """Which gang scheduler, if any, should start a group's pods all at once."""

    scheduler: str | None = None  # "volcano", "coscheduling" or None

    def pod_group(
        self, job: PretrainJob, group: Group, *, members: int | None = None
    ) -> dict[str, Any] | None:
        """The attempt's PodGroup: ``members`` pods (the whole group unless fewer are new)."""
        members = group.world if members is None else members
        name = attempt_name(job, group.attempt)
        if self.scheduler == "volcano":
            api = "scheduling.volcano.sh/v1beta1"
            spec: dict[str, Any] = {"minMember": members}
            if job.spec.queue_name:
                spec["queue"] = job.spec.queue_name
        elif self.scheduler == "coscheduling":
            api = "scheduling.x-k8s.io/v1alpha1"
            spec = {"minMember": members, "scheduleTimeoutSeconds": 600}
        else:
            return None
        return {
            "apiVersion": api,
            "kind": "PodGroup",
            "metadata": _meta(job, name, _labels(job, WORKER, attempt=group.attempt)),
            "spec": spec,
        }

    def mark(self, pod: dict[str, Any], job: PretrainJob, group: Group) -> None:
        name = attempt_name(job, group.attempt)
        if self.scheduler == "volcano":
            pod["metadata"].setdefault("annotations", {})[VOLCANO_GROUP_ANNOTATION] = name
            pod["spec"]["schedulerName"] = "volcano"
        elif self.scheduler == "coscheduling":
            pod["metadata"]["labels"][COSCHEDULING_GROUP_LABEL] = name


@dataclass(frozen=True)
class Options:
    """How the cluster wants the pods: from the operator's settings, the same for every job."""

    gang: Gang = Gang()
    standby_priority_class: str | None = None
    metrics_port: int = contract.DEFAULT_METRICS_PORT
    agents: bool = True
    """Worker pods run the worker agent and outlive attempts (one per slot, ``<job>-w<slot>``);
    otherwise each attempt has its own pods running torchrun."""


# -- names -------------------------------------------------------------------------------------
def service_name(job: PretrainJob) -> str:
    return job.name


def config_name(job: PretrainJob) -> str:
    return f"{job.name}-config"


def service_account_name(job: PretrainJob) -> str:
    return f"{job.name}-worker"


def rendezvous_name(job: PretrainJob) -> str:
    return f"{job.name}-rdzv"


def attempt_name(job: PretrainJob, attempt: int) -> str:
    return f"{job.name}-a{attempt}"


def worker_name(job: PretrainJob, attempt: int, slot: int) -> str:
    return f"{job.name}-a{attempt}-w{slot}"


def slot_pod_name(job: PretrainJob, slot: int) -> str:
    """A slot's worker pod when pods run agents: the same through every attempt."""
    return f"{job.name}-w{slot}"


def standby_name(job: PretrainJob, slot: int) -> str:
    return f"{job.name}-standby-w{slot}"


def export_name(job: PretrainJob, attempt: int) -> str:
    return f"{job.name}-export-{attempt}"


def rendezvous_endpoint(job: PretrainJob, namespace: str) -> str:
    host = f"{rendezvous_name(job)}.{service_name(job)}.{namespace}.svc"
    return f"{host}:{contract.RENDEZVOUS_PORT}"


def selector(job: PretrainJob) -> str:
    """The label selector of every pod the job owns."""
    return f"{JOB}={job.name}"


# -- builders ----------------------------------------------------------------------------------
def _labels(job: PretrainJob, role: str, **extra: int) -> dict[str, str]:
    labels = {JOB: job.name, ROLE: role}
    labels.update({f"{PREFIX}/{key}": str(value) for key, value in extra.items()})
    return labels


def owner_reference(job: PretrainJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.name,
        "uid": job.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(job: PretrainJob, name: str, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if job.metadata.namespace:
        meta["namespace"] = job.metadata.namespace
    if job.metadata.uid:
        meta["ownerReferences"] = [owner_reference(job)]
    return meta


def service(
    job: PretrainJob, *, metrics_port: int = contract.DEFAULT_METRICS_PORT
) -> dict[str, Any]:
    """Headless: pods get DNS names under it, the rendezvous pod included."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(job), {JOB: job.name}),
        "spec": {
            "clusterIP": "None",
            "selector": {JOB: job.name},
            "publishNotReadyAddresses": True,
            "ports": [
                {"name": "rendezvous", "port": contract.RENDEZVOUS_PORT},
                {"name": METRICS_PORT_NAME, "port": metrics_port},
            ],
        },
    }


def config_map(job: PretrainJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, config_name(job), {JOB: job.name}),
        "data": {"run.yaml": job.spec.run_config_yaml()},
    }


def service_account(job: PretrainJob) -> dict[str, Any]:
    """The workers' identity: bound to no Role, and its token is not even mounted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(job, service_account_name(job), {JOB: job.name}),
        "automountServiceAccountToken": False,
    }


_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
}
_POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def _pod(
    job: PretrainJob,
    name: str,
    labels: dict[str, str],
    *,
    command: list[str],
    env: dict[str, str] | None = None,
    worker_like: bool = True,
) -> dict[str, Any]:
    spec = job.spec
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        "command": command,
        "securityContext": dict(_CONTAINER_SECURITY),
    }
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account_name(job),
        "automountServiceAccountToken": False,
        "securityContext": dict(_POD_SECURITY),
        "hostname": name,
        "subdomain": service_name(job),
        "containers": [container],
    }
    if worker_like:  # asks for what a worker needs, where a worker may run
        resources = spec.resources.model_dump(by_alias=True, exclude_defaults=True)
        if resources:
            container["resources"] = resources
        if spec.node_selector:
            pod_spec["nodeSelector"] = dict(spec.node_selector)
        if spec.tolerations:
            pod_spec["tolerations"] = _tolerations(job)
        if spec.priority_class_name:
            pod_spec["priorityClassName"] = spec.priority_class_name
        if spec.scheduler_name:
            pod_spec["schedulerName"] = spec.scheduler_name
    if spec.queue_name:
        labels = {**labels, QUEUE_LABEL: spec.queue_name}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": _meta(job, name, labels),
        "spec": pod_spec,
    }


def group_labels(job: PretrainJob, group: Group, slot: int) -> dict[str, str]:
    """A worker's labels in ``group``: its stage, attempt, slot and rank."""
    rank = group.slots.index(slot)
    return _labels(job, WORKER, stage=group.stage, attempt=group.attempt, slot=slot, rank=rank)


def _worker_like(
    job: PretrainJob,
    group: Group,
    slot: int,
    name: str,
    *,
    command: list[str],
    env: dict[str, str],
    options: Options,
    memory: bool = False,
    members: int | None = None,
) -> dict[str, Any]:
    """A pod that runs trainers, created for ``group``: its grace, ports, volumes (the memory
    tier's too) and how it is admitted."""
    spec = job.spec
    pod = _pod(job, name, group_labels(job, group, slot), command=command, env=env)
    pod_spec, container = pod["spec"], pod["spec"]["containers"][0]
    # SIGTERM -> the trainer's preemption save -> its launcher's own shutdown wait; then SIGKILL.
    grace = spec.checkpoint.preemption_grace_seconds + TORCHRUN_SHUTDOWN_SECONDS + 15
    pod_spec["terminationGracePeriodSeconds"] = int(grace)
    container["ports"] = [{"name": METRICS_PORT_NAME, "containerPort": options.metrics_port}]
    container["terminationMessagePath"] = contract.REPORT_PATH
    container["terminationMessagePolicy"] = "File"
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "shm", "mountPath": "/dev/shm"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_name(job)}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},  # NCCL and data loaders use it
    ]
    if memory:  # the in-memory checkpoint tier (counted in the pod's memory) and the attempts'
        mounts += [  # logs and reports
            {"name": "memory", "mountPath": MEMORY_DIR},
            {"name": "attempts", "mountPath": ATTEMPTS_DIR},
        ]
        volumes += [
            {"name": "memory", "emptyDir": {"medium": "Memory"}},
            {"name": "attempts", "emptyDir": {}},
        ]
    claims, claimed = _claims(job)
    container["volumeMounts"] = mounts + claimed
    pod_spec["volumes"] = volumes + claims
    if spec.queue_name:  # Kueue's pod groups: admitted together
        pod["metadata"]["labels"][KUEUE_GROUP_LABEL] = attempt_name(job, group.attempt)
        count = group.world if members is None else members
        pod["metadata"]["annotations"] = {KUEUE_COUNT_ANNOTATION: str(count)}
    options.gang.mark(pod, job, group)
    return pod


def _tolerations(job: PretrainJob) -> list[dict[str, Any]]:
    return [t.model_dump(by_alias=True, exclude_none=True) for t in job.spec.tolerations]


def _claims(job: PretrainJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """spec.volumes as a pod's volumes and its container's mounts."""
    volumes = [
        {"name": v.name, "persistentVolumeClaim": {"claimName": v.claim_name}}
        for v in job.spec.volumes
    ]
    mounts = [
        {"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only}
        for v in job.spec.volumes
    ]
    return volumes, mounts


def _contract_env(job: PretrainJob, options: Options) -> dict[str, str]:
    return {
        contract.ENV_JOB: job.name,
        contract.ENV_NAMESPACE: job.metadata.namespace or "default",
        contract.ENV_RUN_CONFIG: contract.RUN_CONFIG_PATH,
        contract.ENV_METRICS_PORT: str(options.metrics_port),
    }


def worker_pod(
    job: PretrainJob, group: Group, slot: int, *, options: Options | None = None
) -> dict[str, Any]:
    """One attempt's worker in ``slot``, under torchrun (pods without agents)."""
    options = options or Options()
    spec = job.spec
    namespace = job.metadata.namespace or "default"
    command = [
        "torchrun",
        *contract.torchrun_args(
            nproc=spec.nproc_per_worker,
            endpoint=rendezvous_endpoint(job, namespace),
            rdzv_id=attempt_name(job, group.attempt),
            nnodes=str(group.world),
        ),
    ]
    env = {
        **_contract_env(job, options),
        contract.ENV_STAGE: str(group.stage),
        contract.ENV_ATTEMPT: str(group.attempt),
        contract.ENV_REPORT_PATH: contract.REPORT_PATH,
    }
    name = worker_name(job, group.attempt, slot)
    pod = _worker_like(job, group, slot, name, command=command, env=env, options=options)
    pod["spec"]["containers"][0]["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": METRICS_PORT_NAME},
        "initialDelaySeconds": 120,  # start, rendezvous and restore come before the first step
        "periodSeconds": 30,
        "failureThreshold": 3,
    }
    return pod


def agent_pod(
    job: PretrainJob,
    group: Group,
    slot: int,
    *,
    options: Options | None = None,
    members: int | None = None,
) -> dict[str, Any]:
    """A slot's worker pod whose main process is the worker agent: created for ``group`` (its
    labels say so until the next order relabels it), it outlives the attempt and runs each
    later one the operator orders it to, with its memory tier intact. ``members``: how many
    pods are created with it (a gang or Kueue admits those together; the others run)."""
    options = options or Options()
    spec = job.spec
    namespace = job.metadata.namespace or "default"
    command = [
        "python",
        "-m",
        "pretrain_trainer.agent",
        f"--port={contract.AGENT_PORT}",
        f"--nproc={spec.nproc_per_worker}",
        f"--dir={ATTEMPTS_DIR}",
        # Its trainers' preemption save, inside the pod's grace period.
        f"--grace={spec.checkpoint.preemption_grace_seconds + 15:g}",
    ]
    env = {
        **_contract_env(job, options),
        contract.ENV_STORE: rendezvous_endpoint(job, namespace),
        contract.ENV_MEMORY_ROOT: MEMORY_DIR,
    }
    name = slot_pod_name(job, slot)
    pod = _worker_like(
        job,
        group,
        slot,
        name,
        command=command,
        env=env,
        options=options,
        memory=True,
        members=members,
    )
    container = pod["spec"]["containers"][0]
    container["ports"].append({"name": AGENT_PORT_NAME, "containerPort": contract.AGENT_PORT})
    container["livenessProbe"] = {  # the agent, not its trainers: their ends are reported
        "httpGet": {"path": "/", "port": AGENT_PORT_NAME},
        "initialDelaySeconds": 60,  # the fork server imports torch and DeepSpeed first
        "periodSeconds": 10,
        "failureThreshold": 3,
    }
    # Not ready once its attempt ended: the pod changes, so the operator's watch hears of a
    # trainer's end within a period, without reading every agent every second.
    container["readinessProbe"] = {
        "httpGet": {"path": "/ready", "port": AGENT_PORT_NAME},
        "periodSeconds": READINESS_PERIOD_SECONDS,
        "failureThreshold": 1,
        "successThreshold": 1,
    }
    return pod


def standby_pod(
    job: PretrainJob, slot: int, *, priority_class: str | None = None
) -> dict[str, Any]:
    """Asks for a worker's resources where a worker may run, and sleeps. ``priority_class``
    should be one below every workload's (the chart creates one), so any pod that needs the
    node, this job's next worker or another job's, preempts it."""
    pod = _pod(
        job,
        standby_name(job, slot),
        _labels(job, STANDBY, slot=slot),
        command=["sleep", "infinity"],
    )
    pod["spec"]["terminationGracePeriodSeconds"] = 1
    if priority_class:
        pod["spec"]["priorityClassName"] = priority_class
    return pod


def rendezvous_pod(job: PretrainJob) -> dict[str, Any]:
    pod = _pod(
        job,
        rendezvous_name(job),
        _labels(job, RENDEZVOUS),
        command=[
            "python",
            "-m",
            "pretrain_trainer.rendezvous",
            f"--port={contract.RENDEZVOUS_PORT}",
        ],
        worker_like=False,
    )
    pod["spec"]["restartPolicy"] = "Always"  # a container restart keeps its address
    container = pod["spec"]["containers"][0]
    container["ports"] = [{"name": "rendezvous", "containerPort": contract.RENDEZVOUS_PORT}]
    container["resources"] = {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "1Gi"},
    }
    if job.spec.tolerations:  # may share the workers' tainted nodes
        pod["spec"]["tolerations"] = _tolerations(job)
    return pod


def export_pod(job: PretrainJob, task: ExportTask) -> dict[str, Any]:
    """One try of the export (spec.export): the trainer's ``export`` command on the final
    checkpoint, on the job's volumes. It needs no accelerator (the weights go through host
    memory), so it asks for none and may run on any node the workers' tolerations allow. Its
    last log lines are its termination message when it fails: the command's one-line error."""
    pod = _pod(
        job,
        export_name(job, task.attempt),
        _labels(job, EXPORT, attempt=task.attempt),
        command=["python", "-m", "pretrain_trainer", *task.arguments()],
        worker_like=False,
    )
    pod["spec"]["terminationGracePeriodSeconds"] = 10  # a stopped export leaves nothing behind
    if job.spec.tolerations:
        pod["spec"]["tolerations"] = _tolerations(job)
    container = pod["spec"]["containers"][0]
    container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    container["resources"] = {"requests": {"cpu": "1", "memory": "1Gi"}}
    volumes, mounts = _claims(job)
    if volumes:
        pod["spec"]["volumes"], container["volumeMounts"] = volumes, mounts
    return pod


def job_objects(job: PretrainJob, options: Options | None = None) -> list[dict[str, Any]]:
    """What every job has while it runs, whatever its stage."""
    port = (options or Options()).metrics_port
    return [
        service_account(job),
        service(job, metrics_port=port),
        config_map(job),
        rendezvous_pod(job),
    ]
