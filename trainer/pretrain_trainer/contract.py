"""The contract between the control plane and the trainer (DESIGN 5), in one place.

Both halves import these names: the operator and the local backend to set them, the trainer
to read them. Nothing here imports torch.
"""

from __future__ import annotations

from enum import IntEnum

# Environment variables set for every trainer process.
ENV_JOB = "PRETRAIN_JOB"  # job name
ENV_NAMESPACE = "PRETRAIN_NAMESPACE"  # Kubernetes namespace ("local" for local runs)
ENV_STAGE = "PRETRAIN_STAGE"  # index into RunConfig.stages
ENV_ATTEMPT = "PRETRAIN_ATTEMPT"  # group attempt number, for logs and metrics
ENV_RUN_CONFIG = "PRETRAIN_RUN_CONFIG"  # path of the rendered RunConfig (YAML or JSON)
ENV_CHECKPOINT_ROOT = "PRETRAIN_CHECKPOINT_ROOT"  # overrides RunConfig.checkpoint.path
ENV_METRICS_PORT = "PRETRAIN_METRICS_PORT"  # Prometheus metrics and /healthz
ENV_REPORT_PATH = "PRETRAIN_REPORT_PATH"  # final stage report (a termination-message path)

# Where the operator mounts things inside a worker pod.
RUN_CONFIG_PATH = "/etc/pretrain/run.yaml"
REPORT_PATH = "/dev/termination-log"
DEFAULT_METRICS_PORT = 9400


class ExitCode(IntEnum):
    """What a trainer's exit status tells the control plane."""

    STAGE_COMPLETE = 0
    """The stage's budget was reached and its final checkpoint saved; the report is written."""
    RETRYABLE = 75
    """Transient failure or preemption (EX_TEMPFAIL): restart from the newest checkpoint."""
    PERMANENT = 78
    """Bad configuration or data (EX_CONFIG): restarting cannot help; the job fails."""
