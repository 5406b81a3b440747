"""The PretrainJob spec: a :class:`RunConfig` plus how to run it on a cluster.

Owns the rules that need both halves: how fast each worker count trains a stage's global batch,
which stays exact at every count (docs/design.md, "Any worker count").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pretrain_trainer.config import (
    BatchSplit,
    Problem,
    RunConfig,
    Spec,
    Stage,
    fewest_ranks_as_fast,
)
from pretrain_trainer.config.base import Count
from pydantic import BeforeValidator, ConfigDict, Field, WithJsonSchema

QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
GPU_RESOURCE = "nvidia.com/gpu"


def _quantity_text(value: Any) -> Any:
    # Kubernetes accepts `8` and `"8"` alike; keep one type inside the model.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_text),
    Field(pattern=QUANTITY, max_length=64),
    WithJsonSchema({"x-kubernetes-int-or-string": True}),
]
LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=253)]], Field(max_length=64)]


class Resources(Spec):
    """Compute resources of each worker pod (the trainer container)."""

    requests: dict[Annotated[str, Field(max_length=253)], Quantity] = {}
    """Resources the scheduler reserves, e.g. cpu: 16, memory: 200Gi."""
    limits: dict[Annotated[str, Field(max_length=253)], Quantity] = {}
    """Upper bounds; accelerators go here, e.g. nvidia.com/gpu: 8."""

    def gpus(self) -> int | None:
        value = self.limits.get(GPU_RESOURCE, self.requests.get(GPU_RESOURCE))
        return int(value) if value is not None and value.isdigit() else None


class Toleration(Spec):
    """A Kubernetes toleration for the worker pods."""

    key: str | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = None
    """Taint value for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all."""
    toleration_seconds: Annotated[int, Field(ge=0)] | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class ElasticConfig(Spec):
    """How the worker group grows, shrinks and restarts."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.maxWorkers) || !has(self.minWorkers) "
                    "|| self.minWorkers <= self.maxWorkers",
                    "message": "minWorkers must not exceed maxWorkers",
                }
            ]
        }
    )

    min_workers: Count = 1
    """Fewest workers (pods) the job trains with; below it the job waits for capacity."""
    max_workers: Count | None = None
    """Most workers the job uses; defaults to minWorkers (a fixed-size job)."""
    max_restarts: Annotated[int, Field(ge=0, le=1_000_000)] = 10
    """Group restarts (for any reason but a resize) before the job is marked Failed."""
    restart_backoff_seconds: Annotated[float, Field(ge=0, le=3600)] = 10.0
    """Delay before a restart after a failure; doubles on consecutive failures."""
    scale_up_cooldown_seconds: Annotated[float, Field(ge=0, le=86400)] = 60.0
    """Time to wait after a resize before growing again, so flapping nodes do not thrash."""
    start_timeout_seconds: Annotated[float, Field(gt=0, le=86400)] = 600.0
    """A worker of a new attempt that is still not running after this long (its pod never
    scheduled, its image never pulled) counts as lost: the group restarts without it."""

    @property
    def max_count(self) -> int:
        return self.max_workers if self.max_workers is not None else self.min_workers


@dataclass(frozen=True)
class Band:
    """Worker counts whose longest rank runs the same number of micro-batches: all train a
    step in the same time, so the planner runs the fewest of them (``low``)."""

    low: int
    high: int
    most: int
    """Micro-batches of the longest rank."""
    efficiency: tuple[float, float]
    """Mean over longest micro-batches per rank at ``low`` and at ``high``."""
    useful: float
    """The workers' worth of throughput: ``workers x efficiency``, the same at every count."""

    def counts(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class WorkerCounts:
    """The worker counts a stage may run with, and how fast each trains its global batch.

    Every count in ``[low, high]`` keeps the global batch exact: a world that does not divide
    it runs micro-batch counts that differ by one between ranks (``config.split``), and a step
    costs the longest rank's count. So a count is worth ``workers x efficiency`` workers, and
    the planner runs, on the slots it has, the fewest workers that are as fast as all of them
    (:meth:`best`): 127 nodes of 8 GPUs at batch 4096 do 5 micro-batches a step on the
    longest rank, as 103 do, so 103 run at 99% and 24 stand by, rather than 64 at half speed.
    """

    low: int
    high: int
    micro_batches: int
    """Micro-batches in the global batch (0 when it is not whole micro-batches: none usable)."""
    nproc: int = 1

    @property
    def usable(self) -> range:
        return range(self.low, self.high + 1) if self.micro_batches else range(0)

    def allowed(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}..{self.high}"

    def split(self, workers: int) -> BatchSplit:
        return BatchSplit(self.micro_batches, workers * self.nproc)

    def useful(self, workers: int) -> float:
        """Workers' worth of throughput at ``workers``: ``workers x efficiency``."""
        return workers * self.split(workers).efficiency

    def best(self, available: int) -> int | None:
        """The count to run on ``available`` workers: the fewest as fast as the most that fit
        (a count that divides the batch is the fewest of its speed, so it is kept), never
        below ``low``; None when fewer than ``low`` are available."""
        top = min(available, self.high)
        if not self.micro_batches or top < self.low:
            return None
        ranks = fewest_ranks_as_fast(self.micro_batches, top * self.nproc)
        return max(self.low, -(-ranks // self.nproc))

    def bands(self) -> list[Band]:
        """The usable counts grouped by speed, fastest first."""
        bands, high = [], self.high
        while self.micro_batches and high >= self.low:
            low = self.best(high)
            assert low is not None
            most = self.split(high).most
            efficiency = (self.split(low).efficiency, self.split(high).efficiency)
            bands.append(Band(low, high, most, efficiency, self.useful(low)))
            high = low - 1
        return bands

    def idle_above(self) -> int | None:
        """The largest count at which every process has a micro-batch, when ``high`` exceeds
        it: above it some processes only pad."""
        most = self.micro_batches // self.nproc
        return most if self.micro_batches and self.high > most else None


class Volume(Spec):
    """A PersistentVolumeClaim mounted into every worker (data shards, checkpoints)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]
    """Volume name inside the pod."""
    claim_name: Annotated[str, Field(min_length=1, max_length=253)]
    """The PersistentVolumeClaim (ReadWriteMany for more than one node)."""
    mount_path: Annotated[str, Field(pattern=r"^/", max_length=4096)]
    """Where it is mounted; data.sources[].path and checkpoint.path point under it."""
    read_only: bool = False
    """Mount read-only (data sets)."""


class PretrainJobSpec(RunConfig):
    """Desired state of a PretrainJob: the training run and how to run it on the cluster."""

    image: Annotated[str, Field(min_length=1, max_length=1024)]
    """Trainer container image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    """Image pull policy of the trainer container."""
    resources: Resources = Resources()
    """Resources of each worker pod."""
    nproc_per_worker: Annotated[int, Field(ge=1, le=256)] = 1
    """Trainer processes per worker pod (one per accelerator)."""
    node_selector: LabelMap = {}
    """Node labels the worker pods require."""
    tolerations: Annotated[list[Toleration], Field(max_length=64)] = []
    """Tolerations of the worker pods."""
    priority_class_name: Annotated[str, Field(max_length=253)] | None = None
    """PriorityClass of the worker pods (preemption order)."""
    scheduler_name: Annotated[str, Field(max_length=253)] | None = None
    """Scheduler of the worker pods (e.g. volcano)."""
    queue_name: Annotated[str, Field(max_length=253)] | None = None
    """Kueue LocalQueue to admit the job through."""
    volumes: Annotated[list[Volume], Field(max_length=16)] = []
    """Shared volumes mounted into every worker: the data and the checkpoint path live here."""
    elastic: ElasticConfig = ElasticConfig()
    """Elastic policy: worker bounds, restarts, back-off and cool-down."""
    suspend: bool = False
    """Stop all workers and keep the checkpoints; set back to false to resume."""

    def run_config(self) -> RunConfig:
        """What the trainer is given: the spec less how to run it on the cluster."""
        fields = set(RunConfig.model_fields)
        return RunConfig.model_validate(self.model_dump(by_alias=True, include=fields))

    def run_config_yaml(self) -> str:
        """The run config as the trainer reads it (a ConfigMap's run.yaml, or a local file)."""
        data = self.run_config().model_dump(mode="json", by_alias=True)
        return yaml.safe_dump(data, sort_keys=False)

    def worker_counts(self, stage: Stage) -> WorkerCounts:
        low, high = (
            (stage.workers.min, stage.workers.max)
            if stage.workers is not None
            else (self.elastic.min_workers, self.elastic.max_count)
        )
        whole = stage.global_batch_size % stage.micro_batch_size == 0
        micro_batches = stage.global_batch_size // stage.micro_batch_size if whole else 0
        return WorkerCounts(low, high, micro_batches, self.nproc_per_worker)

    def problems(self) -> Iterator[Problem]:
        yield from super().problems()
        if self.elastic.min_workers > self.elastic.max_count:
            yield Problem(
                ("elastic", "minWorkers"),
                f"({self.elastic.min_workers}) exceeds maxWorkers ({self.elastic.max_count})",
            )

    def warnings(self) -> Iterator[Problem]:
        """Legal but probably unintended settings, worth showing a user."""
        for i, stage in enumerate(self.stages):
            counts = self.worker_counts(stage)
            idle = counts.idle_above()
            if idle is None:
                continue
            path = ("stages", i, "workers", "max") if stage.workers else ("elastic", "maxWorkers")
            batch = (
                f"globalBatchSize {stage.global_batch_size} is {counts.micro_batches} "
                f"micro-batches of {stage.micro_batch_size}"
            )
            yield Problem(
                path,
                f"({counts.high}): {batch}, enough for {idle} workers of "
                f"{self.nproc_per_worker} process(es); above that some processes have no "
                "micro-batch, and more workers never train faster",
            )
        gpus = self.resources.gpus()
        if gpus is not None and gpus != self.nproc_per_worker:
            yield Problem(
                ("nprocPerWorker",),
                f"({self.nproc_per_worker}) differs from the {gpus} GPUs each worker requests",
            )
