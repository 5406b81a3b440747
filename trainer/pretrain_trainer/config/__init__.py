"""Typed configuration of a training run. Imports neither torch nor Kubernetes libraries."""

from .base import Checked, Problem, Spec, SpecError, format_path, prefixed
from .evaluation import Evaluation
from .model import MODULE_ROOTS, ModelConfig, MoE
from .parallel import Coordinates, Layout, Parallelism
from .split import BatchSplit, fewest_ranks_as_fast
from .training import (
    Budget,
    CheckpointConfig,
    DataConfig,
    DataSource,
    LRSchedule,
    Optimizer,
    RunConfig,
    Stage,
    TrainerOptions,
    WorkerRange,
    WorldSizeError,
)

__all__ = [
    "MODULE_ROOTS",
    "BatchSplit",
    "Budget",
    "Checked",
    "CheckpointConfig",
    "Coordinates",
    "DataConfig",
    "DataSource",
    "Evaluation",
    "LRSchedule",
    "Layout",
    "MoE",
    "ModelConfig",
    "Optimizer",
    "Parallelism",
    "Problem",
    "RunConfig",
    "Spec",
    "SpecError",
    "Stage",
    "TrainerOptions",
    "WorkerRange",
    "WorldSizeError",
    "fewest_ranks_as_fast",
    "format_path",
    "prefixed",
]
