"""The contract between the control plane and the trainer (docs/design.md, "The contract"),
in one place.

Both halves import these names: the operator and the local backend to set them, the trainer
to read them. The way in is the environment (:class:`TrainerEnv`) and the run config; the way
back is two typed records, each with one writer and one parser here: the :class:`StageReport`
(or :class:`FailureReport`) a trainer leaves when it exits, and the :class:`StepRecord` rank 0
appends for every optimizer step. Both are camelCase JSON and ignore keys they do not know, so
an older control plane reads a newer trainer. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from .errors import PermanentError
from .fsio import replace_atomic

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
ENV_MEMORY_ROOT = "PRETRAIN_MEMORY_ROOT"  # this worker's in-memory checkpoint tier (a tmpfs)
# Set by the worker agent for each trainer process it starts (instead of torchrun's rendezvous):
ENV_STORE = "PRETRAIN_STORE"  # host:port of the job's store; the group meets under a prefix
ENV_STORE_PREFIX = "PRETRAIN_STORE_PREFIX"  # the attempt's key prefix in that store
ENV_LAUNCHED_AT = "PRETRAIN_LAUNCHED_AT"  # when the agent was told to start the attempt (Unix)
ENV_LISTEN_HOST = "PRETRAIN_LISTEN_HOST"  # where the agent and the metrics listen (0.0.0.0)
AGENT_PORT = 9401  # the worker agent's HTTP port in pods

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
    the rendezvous down; ``nnodes`` fixed by the control plane, no restarts in place
    (docs/design.md, "How a job runs"). Arguments after ``torchrun`` (or
    ``python -m torch.distributed.run``)."""
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


class ContractError(PermanentError):
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
    memory_root: str | None = None

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
            memory_root=environ.get(ENV_MEMORY_ROOT) or None,
        )


def _finite_or_none(value: object) -> object:
    """A loss that is not a finite number (no step yet, or a diverged one) is reported as
    unknown: JSON has no NaN, and a status must stay valid JSON."""
    if isinstance(value, int | float) and not math.isfinite(value):
        return None
    return value


Loss = Annotated[float | None, BeforeValidator(_finite_or_none)]


class _Record(BaseModel):
    """A record on the way back: frozen, camelCase, tolerant of keys it does not know."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,  # a record the status keeps documents its CRD fields
    )

    def to_json(self) -> str:
        """One line of JSON; absent optional fields are left out."""
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def parse(cls, text: str | bytes | None) -> Self | None:
        """The record in ``text``, or None when there is none or it is not this record."""
        if not text:
            return None
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None


class Usage(_Record):
    """What rank 0 of an attempt has spent, cumulative since its process started: the trainer's
    half of goodput. The control plane reads it from the step log locally and from
    ``/metrics`` on Kubernetes, and a finished stage's report carries it whole; the status
    keeps the running attempt's (``status.usage``)."""

    attempt: int
    """The attempt it trains for."""
    resumed_step: int = 0
    """The step the attempt started from (0 at a stage's start)."""
    step: int = 0
    """Its newest step."""
    steps: int = 0
    """Steps this attempt ran."""
    step_seconds: float = 0.0
    """Seconds inside those steps."""
    restore_seconds: float = 0.0
    """Seconds its restore took."""
    blocking_seconds: float = 0.0
    """Seconds checkpoint saves blocked training."""
    checkpoint_step: int | None = None
    """Step of the newest checkpoint it made durable."""
    checkpoint_step_seconds: float = 0.0
    """Seconds inside steps up to that checkpoint's step (what a failure would not redo)."""
    checkpoint_time: float | None = None
    """When that checkpoint became durable (Unix time)."""
    last_step_time: float | None = None
    """When its newest step ended (Unix time)."""
    launcher_time: float | None = None
    """When its launcher started (Unix time; see the trainer's ``Startup``)."""
    group_time: float | None = None
    """When its process group was up."""
    engine_time: float | None = None
    """When its engine was built."""
    restored_time: float | None = None
    """When its restore was done."""
    first_step_time: float | None = None
    """When its first step ended."""
    eval_seconds: float = 0.0
    """Seconds spent measuring the held-out loss."""


class StageReport(_Record):
    """A stage's budget was reached and its final checkpoint saved (exit code 0)."""

    finished: Literal[True] = True
    stage: int
    step: int
    tokens: int
    loss: Loss = None
    eval_loss: Mapping[str, Loss] | None = None
    """The held-out loss of each eval source at the stage's end."""
    checkpoint: str
    """Directory of the stage's final checkpoint."""
    # What the control plane needs is above; the rest describes the run.
    job: str | None = None
    stage_name: str | None = None
    skipped_steps: int = 0
    world_size: int | None = None
    usage: Usage | None = None
    """What the attempt spent, to its last step (goodput, where ``/metrics`` was last read a
    moment before the end)."""


class FailureReport(_Record):
    """The trainer stopped with an error it knows retrying cannot fix (exit code 78)."""

    finished: Literal[False] = False
    exit_code: int = int(ExitCode.PERMANENT)
    error: str


def parse_report(text: str | bytes | None) -> StageReport | FailureReport | None:
    """The report a trainer left (a termination message or a file), or None."""
    return StageReport.parse(text) or FailureReport.parse(text)


def write_report(path: str | Path, report: StageReport | FailureReport) -> None:
    """The report, written atomically (a reader never sees half a report)."""
    target = Path(path)
    payload = (report.to_json() + "\n").encode()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        replace_atomic(target, payload, durable=False)
    except OSError:
        # A kubelet termination-message file is a bind mount: it cannot be renamed over.
        target.write_bytes(payload)


def read_report(path: Path) -> StageReport | FailureReport | None:
    try:
        return parse_report(path.read_bytes())
    except OSError:
        return None


STARTUP_EVENTS = ("launcher", "group", "engine", "restored")
"""The moments of an attempt's start the trainer reports, in order (:class:`Startup`)."""


class AttemptOrder(_Record):
    """What a worker agent is told to run (``PUT /attempt``): its worker's share of one
    attempt. The same order again changes nothing; a newer attempt replaces the running one."""

    attempt: int
    stage: int
    rank: int
    """The worker's place in the group (its node rank): ranks ``rank * nproc ...``."""
    workers: int
    """Workers in the group."""
    store: str = ""
    """``host:port`` of the job's long-lived store, where the group meets; empty: the agent's
    own ``PRETRAIN_STORE`` (a pod's, which names the job's rendezvous service)."""
    run_config: str | None = None
    """The attempt's run config (YAML), when it is not the agent's own file: a pod that
    outlives attempts would otherwise read a mounted ConfigMap that trails a spec change."""


class AgentState(_Record):
    """What a worker agent reports (``GET /``): its identity and its latest attempt."""

    agent: str
    """Changes whenever the agent (re)starts: a different value is a different agent."""
    attempt: int | None = None
    stage: int | None = None
    running: bool = False
    exit_code: int | None = None
    """Once every process of the attempt exited: the first failure's code (a signal s as
    128 + s), else 0."""
    started_at: float | None = None
    ended_at: float | None = None
    report: str | None = None
    """The attempt's report (:func:`parse_report`), once rank 0 of this worker wrote one."""


class Startup(_Record):
    """When rank 0 of an attempt got through each part of its start (Unix times). With the
    control plane's own times (the loss, the attempt's start, the pods bound) and the first
    step's end they split a recovery into its phases (docs/design.md, "Goodput")."""

    launcher: float
    """The launcher started (torchrun's agent: the worker's main process); the trainer
    process itself where there is none."""
    group: float
    """The process group is up: every rank has joined (the launcher's rendezvous, the trainer
    process's start and imports before it)."""
    engine: float
    """The model and DeepSpeed's engine are built."""
    restored: float
    """The checkpoint is loaded (the same as ``engine`` where nothing was restored)."""


class StepRecord(_Record):
    """One optimizer step, as rank 0 appends it to the step log (``ENV_STEP_LOG``)."""

    stage: int
    step: int
    attempt: int | None = None
    """The attempt whose trainer ran it (``ENV_ATTEMPT``)."""
    tokens: int
    """Tokens trained in the stage so far."""
    loss: Loss = None
    """Mean loss over the global batch."""
    lr: float
    grad_norm: float | None = None
    skipped: bool = False
    """The stability guard skipped this step's update."""
    seconds: float
    """Wall time inside the step."""
    time: float
    """Unix time at its end."""
    world_size: int
    micro_batches_most: int | None = None
    """Micro-batches of the longest rank at this world size: what the step cost."""
    micro_batches_fewest: int | None = None
    """Micro-batches of the shortest rank (the same as the longest where the split is even)."""
    restore_seconds: float | None = None
    """On the first step after a restore: what the restore cost."""
    checkpoint_blocking: float | None = None
    """On the first step after a save: how long that save blocked training."""
    checkpointed: int | None = None
    """On the first step after a checkpoint became durable: that checkpoint's step."""
    startup: Startup | None = None
    """On an attempt's first step: when its start reached each point."""
    aux_loss: float | None = None
    expert_load: list[float] | None = None
    """MoE models: the share of tokens routed to each expert (mean over the MoE layers)."""
    eval_loss: Mapping[str, Loss] | None = None
    """After an evaluation: the held-out loss of each eval source."""
    eval_seconds: float | None = None
    """After an evaluation: what it took (not part of ``seconds``)."""

    def slim(self) -> StepRecord:
        """The record without its per-expert detail (what accounting keeps of every step)."""
        if self.expert_load is None:
            return self
        return self.model_copy(update={"expert_load": None})


def append_step(path: Path, record: StepRecord) -> None:
    with path.open("a") as out:
        out.write(record.to_json() + "\n")


def parse_step(line: str | bytes) -> StepRecord | None:
    return StepRecord.parse(line)
