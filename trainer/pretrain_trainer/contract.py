"""The contract between the control plane and the trainer (DESIGN 5), in one place.

Both halves import these names: the operator and the local backend to set them, the trainer
to read them. Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
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
ENV_STEP_LOG = "PRETRAIN_STEP_LOG"  # optional JSON-lines file, one record per step (rank 0)

# Where the operator mounts things inside a worker pod.
RUN_CONFIG_PATH = "/etc/pretrain/run.yaml"
REPORT_PATH = "/dev/termination-log"
DEFAULT_METRICS_PORT = 9400


RENDEZVOUS_PORT = 29400


def torchrun_args(
    *,
    nproc: int,
    endpoint: str,
    rdzv_id: str,
    nnodes: str,
    rdzv_conf: str = "",
    max_restarts: int = 0,
) -> list[str]:
    """How a worker starts: a torchrun agent that meets its peers at the job's long-lived
    rendezvous store and never hosts it (``is_host=false``), so no single worker's loss takes
    the rendezvous down; ``nnodes`` fixed by the control plane, no restarts in place (DESIGN 4).
    Arguments after ``torchrun`` (or ``python -m torch.distributed.run``)."""
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        f"--rdzv-conf=is_host=false{rdzv_conf}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        "-m",
        "pretrain_trainer",
    ]


class ExitCode(IntEnum):
    """What a trainer's exit status tells the control plane."""

    STAGE_COMPLETE = 0
    """The stage's budget was reached and its final checkpoint saved; the report is written."""
    RETRYABLE = 75
    """Transient failure or preemption (EX_TEMPFAIL): restart from the newest checkpoint."""
    PERMANENT = 78
    """Bad configuration or data (EX_CONFIG): restarting cannot help; the job fails."""


class ContractError(ValueError):
    """The environment the trainer was started with is incomplete or malformed."""


@dataclass(frozen=True)
class TrainerEnv:
    """The contract's environment, parsed once at start."""

    job: str
    namespace: str
    stage: int
    attempt: int
    run_config: str
    checkpoint_root: str | None
    metrics_port: int | None
    report_path: str | None
    step_log: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TrainerEnv:
        def integer(name: str, default: int | None) -> int | None:
            raw = environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ContractError(f"{name}={raw!r} is not an integer") from None

        missing = [n for n in (ENV_JOB, ENV_STAGE) if not environ.get(n)]
        if missing:
            raise ContractError(f"missing environment variable(s): {', '.join(missing)}")
        stage = integer(ENV_STAGE, None)
        if stage is None or stage < 0:
            raise ContractError(f"{ENV_STAGE} must be a stage index >= 0")
        return cls(
            job=environ[ENV_JOB],
            namespace=environ.get(ENV_NAMESPACE) or "local",
            stage=stage,
            attempt=integer(ENV_ATTEMPT, 0) or 0,
            run_config=environ.get(ENV_RUN_CONFIG) or RUN_CONFIG_PATH,
            checkpoint_root=environ.get(ENV_CHECKPOINT_ROOT) or None,
            metrics_port=integer(ENV_METRICS_PORT, None),
            report_path=environ.get(ENV_REPORT_PATH) or None,
            step_log=environ.get(ENV_STEP_LOG) or None,
        )
