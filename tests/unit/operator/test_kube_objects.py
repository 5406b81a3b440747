"""The objects the operator creates, as data: names, labels, scheduling, security, and that
Kubernetes' own schemas accept them (``pretrainctl render`` prints exactly these)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml
from pretrain_operator.cli import main
from pretrain_operator.kube.objects import Gang, Options, standby_pod
from pretrain_operator.kube.render import render
from pretrain_operator.manifests import load_job

from tests.conftest import ROOT

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _pods(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == "Pod"]


@pytest.mark.parametrize("version", ["1.29", "1.31", "1.33"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_rendered_objects_validate_against_kubernetes_schemas(example: Any, version: str) -> None:
    job = load_job(example)
    objects = [*render(job, namespace="ml"), standby_pod(job, 0)]
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_pod_runs_unprivileged_without_host_access(example: Any) -> None:
    job = load_job(example)
    for pod in [*_pods(render(job, namespace="ml")), standby_pod(job, 0)]:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        assert not any("hostPath" in v for v in spec.get("volumes", []))
        assert not spec.get("hostNetwork")
        assert not spec.get("hostPID")
        for container in spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False
            assert security["privileged"] is False
            assert security["capabilities"] == {"drop": ["ALL"]}


def test_worker_pods_carry_the_spec_scheduling_and_the_trainer_contract() -> None:
    job = load_job(ROOT / "examples" / "deepseek-3stage.yaml")
    spec = job.spec
    workers = [
        p
        for p in _pods(render(job, namespace="ml", stage=1, workers=64))
        if p["metadata"]["labels"]["pretrain.dev/role"] == "worker"
    ]
    assert len(workers) == 64
    last = workers[-1]
    assert last["metadata"]["name"] == f"{job.name}-a1-w63"
    labels = last["metadata"]["labels"]
    assert labels["pretrain.dev/stage"] == "1"
    assert labels["pretrain.dev/rank"] == "63"
    pod_spec, container = last["spec"], last["spec"]["containers"][0]
    assert pod_spec["nodeSelector"] == spec.node_selector
    assert len(pod_spec.get("tolerations", [])) == len(spec.tolerations)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert f"--nproc-per-node={spec.nproc_per_worker}" in container["command"]
    assert "--nnodes=64" in container["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (env["PRETRAIN_STAGE"], env["PRETRAIN_REPORT_PATH"]) == ("1", "/dev/termination-log")
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["ports"] == [{"name": "metrics", "containerPort": 9400}]
    # SIGTERM, the preemption save and torchrun's own shutdown all fit in the grace period.
    assert pod_spec["terminationGracePeriodSeconds"] > spec.checkpoint.preemption_grace_seconds + 30


@pytest.mark.parametrize(
    ("scheduler", "api_version", "marker"),
    [
        (
            "volcano",
            "scheduling.volcano.sh/v1beta1",
            ("annotations", "scheduling.k8s.io/group-name"),
        ),
        (
            "coscheduling",
            "scheduling.x-k8s.io/v1alpha1",
            ("labels", "scheduling.x-k8s.io/pod-group"),
        ),
    ],
)
def test_gang_scheduling_adds_a_pod_group_of_the_whole_group(
    scheduler: str, api_version: str, marker: tuple[str, str]
) -> None:
    job = load_job(ROOT / "examples" / "tiny-cpu.yaml")
    objects = render(job, namespace="ml", options=Options(gang=Gang(scheduler)))
    group = next(o for o in objects if o["kind"] == "PodGroup")
    assert (group["apiVersion"], group["spec"]["minMember"]) == (api_version, 2)
    for pod in _pods(objects):
        if pod["metadata"]["labels"]["pretrain.dev/role"] == "worker":
            assert pod["metadata"][marker[0]][marker[1]] == group["metadata"]["name"]


def test_a_queue_name_labels_every_pod_for_kueue_as_one_pod_group() -> None:
    job = load_job(ROOT / "examples" / "tiny-cpu.yaml")
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"queue_name": "team-a"})})
    workers = [
        p
        for p in _pods(render(job, namespace="ml"))
        if p["metadata"]["labels"]["pretrain.dev/role"] == "worker"
    ]
    for pod in workers:
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "tiny-cpu-a1"
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"


def test_render_prints_yaml_documents_and_refuses_an_impossible_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny = str(ROOT / "examples" / "tiny-cpu.yaml")
    assert main(["render", tiny, "--namespace", "ml"]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    kinds = [d["kind"] for d in documents]
    assert kinds == ["ServiceAccount", "Service", "ConfigMap", "Pod", "Pod", "Pod"]
    assert yaml.safe_load(documents[2]["data"]["run.yaml"])["stages"][0]["name"] == "foundation"
    assert main(["render", tiny, "--stage", "7"]) == 2
    assert "--stage 7: the job has stages 0..2" in capsys.readouterr().err
