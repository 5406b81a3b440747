"""The PretrainJob API (group pretrain.dev, version v1alpha1): spec, status, parsing.

Pure: imports pydantic and the trainer's config types, never kopf, kubernetes or torch.
"""

from .job import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    ObjectMeta,
    PretrainJob,
    parse_job,
)
from .spec import (
    Band,
    ElasticConfig,
    PretrainJobSpec,
    Resources,
    Toleration,
    Volume,
    WorkerCounts,
)
from .status import (
    CheckpointStatus,
    Condition,
    ConditionType,
    JobStatus,
    MicroBatchesStatus,
    Phase,
    Reason,
    RestartsStatus,
    StageRecord,
    StageStatus,
    WorkersStatus,
    set_condition,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "Band",
    "CheckpointStatus",
    "Condition",
    "ConditionType",
    "ElasticConfig",
    "JobStatus",
    "MicroBatchesStatus",
    "ObjectMeta",
    "Phase",
    "PretrainJob",
    "PretrainJobSpec",
    "Reason",
    "Resources",
    "RestartsStatus",
    "StageRecord",
    "StageStatus",
    "Toleration",
    "Volume",
    "WorkerCounts",
    "WorkersStatus",
    "parse_job",
    "set_condition",
]
