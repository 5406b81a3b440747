"""The PretrainJob spec: a :class:`RunConfig` plus how to run it on a cluster.

Owns the rules that need both halves: how fast each worker count trains a stage's global batch,
which stays exact at every count (docs/design.md, "Any worker count").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pretrain_trainer.config import (
    BatchSplit,
    Parallelism,
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
    step in the same time, so the planner runs the fewest of them (``low``). Under a parallel
    layout only every ``step``-th count fits (``WorkerCounts.fits``)."""

    low: int
    high: int
    most: int
    """Micro-batches of the longest rank."""
    efficiency: tuple[float, float]
    """Mean over longest micro-batches per rank at ``low`` and at ``high``."""
    useful: float
    """The workers' worth of throughput: ``workers x efficiency``, the same at every count."""
    step: int = 1

    def members(self) -> range:
        return range(self.low, self.high + 1, self.step)

    def counts(self) -> str:
        if self.low == self.high:
            return str(self.low)
        every = f" every {self.step}" if self.step > 1 else ""
        return f"{self.low}-{self.high}{every}"


@dataclass(frozen=True)
class WorkerCounts:
    """The worker counts a stage may run with, and how fast each trains its global batch.

    Every count in ``[low, high]`` keeps the global batch exact: a world that does not divide
    it runs micro-batch counts that differ by one between ranks (``config.split``), and a step
    costs the longest rank's count. So a count is worth ``workers x efficiency`` workers, and
    the planner runs, on the slots it has, the fewest workers that are as fast as all of them
    (:meth:`best`): 127 nodes of 8 GPUs at batch 4096 do 5 micro-batches a step on the
    longest rank, as 103 do, so 103 run at 99% and 24 stand by, rather than 64 at half speed.

    A parallel layout (``config.parallel``) splits over data-parallel ranks, ``nproc /
    (tensor x pipeline)`` per worker, and allows only the counts that :meth:`fits`: a
    data-parallel degree that is a multiple of ``expert`` (every ``step``-th count), and under
    pipeline parallelism one that divides the micro-batches (its engine needs an even split).
    """

    low: int
    high: int
    micro_batches: int
    """Micro-batches in the global batch (0 when it is not whole micro-batches: none usable)."""
    nproc: int = 1
    parallelism: Parallelism = field(default_factory=Parallelism)

    @property
    def per_worker(self) -> int:
        """Data-parallel ranks per worker (0 when a worker is not whole replicas)."""
        replica = self.parallelism.replica
        return self.nproc // replica if self.nproc % replica == 0 else 0

    @property
    def step(self) -> int:
        """Counts that fit are multiples of this: their data-parallel degree is whole experts."""
        expert = self.parallelism.expert
        return expert // math.gcd(expert, self.per_worker) if self.per_worker else 1

    @property
    def even(self) -> bool:
        """Whether only even splits run (pipeline parallelism)."""
        return self.parallelism.pipeline > 1

    def fits(self, workers: int) -> bool:
        """Whether ``workers`` may run the stage: inside the bounds, with an exact batch that
        the layout can split."""
        return (
            self.low <= workers <= self.high
            and bool(self.micro_batches and self.per_worker)
            and workers % self.step == 0
            and (not self.even or self.micro_batches % (workers * self.per_worker) == 0)
        )

    @property
    def usable(self) -> Sequence[int]:
        """The counts that fit, ascending."""
        if not self.micro_batches or not self.per_worker:
            return range(0)
        if self.even:  # divisors: few, however wide the bounds
            return [n for n in self._divisor_counts() if self.low <= n <= self.high]
        return range(self._round_up(self.low), self.high + 1, self.step)

    def allowed(self) -> str:
        if self.low == self.high:
            return str(self.low)
        if self.even:
            return ", ".join(map(str, self.usable)) or "none"
        every = f" (multiples of {self.step})" if self.step > 1 else ""
        return f"{self.low}..{self.high}{every}"

    def data_parallel(self, workers: int) -> int:
        return workers * self.per_worker

    def split(self, workers: int) -> BatchSplit:
        return BatchSplit(self.micro_batches, self.data_parallel(workers))

    def useful(self, workers: int) -> float:
        """Workers' worth of throughput at ``workers``: ``workers x efficiency``."""
        return workers * self.split(workers).efficiency

    def best(self, available: int) -> int | None:
        """The count to run on ``available`` workers: the fewest as fast as the most that fit
        (a count that divides the batch is the fewest of its speed, so it is kept), never
        below ``low``; None when no count fits in ``available``."""
        top = min(available, self.high)
        if not self.micro_batches or not self.per_worker or top < self.low:
            return None
        if self.even:
            fitting = [n for n in self.usable if n <= top]
            return fitting[-1] if fitting else None
        top -= top % self.step
        if top < self._round_up(self.low):
            return None
        ranks = fewest_ranks_as_fast(self.micro_batches, self.data_parallel(top))
        return max(self._round_up(self.low), self._round_up(-(-ranks // self.per_worker)))

    def bands(self) -> list[Band]:
        """The usable counts grouped by speed, fastest first."""
        bands, high = [], self.high
        while (top := self.best(high)) is not None:
            high = (
                max(n for n in self.usable if n <= high) if self.even else high - high % self.step
            )
            most = self.split(high).most
            efficiency = (self.split(top).efficiency, self.split(high).efficiency)
            bands.append(Band(top, high, most, efficiency, self.useful(top), self.step))
            high = top - 1
        return bands

    def idle_above(self) -> int | None:
        """The largest count at which every process has a micro-batch, when ``high`` exceeds
        it: above it some processes only pad."""
        if not self.per_worker:
            return None
        most = self.micro_batches // self.per_worker
        return most if self.micro_batches and self.high > most else None

    def _round_up(self, workers: int) -> int:
        return -(-workers // self.step) * self.step

    def _divisor_counts(self) -> list[int]:
        """Counts whose data-parallel degree divides the micro-batches, ascending."""
        m, found = self.micro_batches, set[int]()
        for d in range(1, math.isqrt(m) + 1):
            if m % d == 0:
                found.update((d, m // d))
        return sorted(
            dp // self.per_worker
            for dp in found
            if dp % self.per_worker == 0 and (dp // self.per_worker) % self.step == 0
        )


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


class ExportSpec(Spec):
    """Export the last stage's final checkpoint as a model other tools load, before the job
    is Succeeded."""

    path: Annotated[str, Field(min_length=1, max_length=4096)]
    """The directory to write (it must not exist yet); on a cluster, on one of spec.volumes
    (relative paths resolve against the run directory locally)."""
    format: Literal["hf"] = "hf"
    """hf: a Hugging Face model directory (LlamaForCausalLM or MixtralForCausalLM,
    safetensors, its config and the tokenizer the data was prepared with)."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """The weights' type in the export (fp32: as checkpointed)."""


def _under(path: str, mount: str) -> bool:
    """Whether ``path`` lies strictly inside the directory ``mount``."""
    parts, base = PurePosixPath(path).parts, PurePosixPath(mount).parts
    return len(parts) > len(base) and parts[: len(base)] == base


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
    export: ExportSpec | None = None
    """Export the trained model when the last stage finishes (status.export says where)."""

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
        return WorkerCounts(low, high, micro_batches, self.nproc_per_worker, stage.parallelism)

    def problems(self) -> Iterator[Problem]:
        yield from super().problems()
        if self.elastic.min_workers > self.elastic.max_count:
            yield Problem(
                ("elastic", "minWorkers"),
                f"({self.elastic.min_workers}) exceeds maxWorkers ({self.elastic.max_count})",
            )
        for i, stage in enumerate(self.stages):
            yield from self._layout_problems(i, stage)
        if self.export is not None and ".." in PurePosixPath(self.export.path).parts:
            yield Problem(("export", "path"), f"{self.export.path}: '..' is not allowed")
        elif self.export is not None and self.volumes and self.export.path.startswith("/"):
            writable = [v.mount_path for v in self.volumes if not v.read_only]
            if not any(_under(self.export.path, mount) for mount in writable):
                yield Problem(
                    ("export", "path"),
                    f"{self.export.path} is on no writable volume; spec.volumes mounts "
                    + (", ".join(writable) or "none writable"),
                )

    def _layout_problems(self, index: int, stage: Stage) -> Iterator[Problem]:
        """A worker holds whole replicas, and some worker count in the bounds fits the layout."""
        layout, path = stage.parallelism, ("stages", index, "parallelism")
        if self.nproc_per_worker % layout.replica:
            yield Problem(
                path,
                f"tensor x pipeline = {layout.replica} processes must divide nprocPerWorker "
                f"({self.nproc_per_worker}): a worker holds whole replicas of the model",
            )
            return
        counts = self.worker_counts(stage)
        if layout.trivial or not counts.micro_batches or counts.usable:
            return
        bounds = ("stages", index, "workers") if stage.workers else ("elastic",)
        wanted = [f"a multiple of expert ({layout.expert})"] if layout.expert > 1 else []
        if counts.even:
            wanted.append(f"a divisor of the {counts.micro_batches} micro-batches (pipeline)")
        need = f"a data-parallel degree (workers x {counts.per_worker}) that is " + " and ".join(
            wanted
        )
        yield Problem(
            bounds,
            f"no worker count in {counts.low}..{counts.high} fits stage {stage.name!r}: "
            f"{layout.describe()} needs {need}",
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
