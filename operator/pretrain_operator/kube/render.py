"""``pretrainctl render``: the objects the operator would create for a job's stage, as YAML a
user can read or pipe to ``kubectl apply``. Pure: the same builders the operator uses."""

from __future__ import annotations

from typing import Any

import yaml

from ..api import PretrainJob
from ..plan import Group, choose_world
from .objects import Options, job_objects, worker_pod


class RenderError(ValueError):
    pass


def render(
    job: PretrainJob,
    *,
    namespace: str,
    stage: int = 0,
    workers: int | None = None,
    options: Options | None = None,
) -> list[dict[str, Any]]:
    spec = job.spec
    if not 0 <= stage < len(spec.stages):
        raise RenderError(f"--stage {stage}: the job has stages 0..{len(spec.stages) - 1}")
    wanted = spec.elastic.max_count if workers is None else workers
    world = choose_world(spec, stage=stage, available=wanted)
    if world is None:
        counts = spec.worker_counts(spec.stages[stage])
        raise RenderError(
            f"--workers {wanted}: stage {spec.stages[stage].name} runs on "
            f"{counts.allowed()} workers"
        )
    job = job.model_copy(
        update={"metadata": job.metadata.model_copy(update={"namespace": namespace})}
    )
    group = Group(stage=stage, attempt=1, slots=tuple(range(world)))
    options = options or Options()
    objects = job_objects(job, options)
    pod_group = options.gang.pod_group(job, group)
    if pod_group is not None:
        objects.append(pod_group)
    objects.extend(worker_pod(job, group, slot, options=options) for slot in group.slots)
    return objects


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the run config) as literal blocks, readable in the output."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)
