"""Entry point of a trainer process (``python -m pretrain_trainer`` under torchrun).

Reads the contract (environment + run config), sets the stage up (:func:`setup`), trains it
and exits with a code the control plane understands: 0 stage complete, 75 retryable, 78
permanent (any :class:`~pretrain_trainer.errors.PermanentError`: a bad config, data, storage
or environment), with a report saying which.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import contract
from .ckpt.store import check_writable
from .config import BatchSplit, Layout, RunConfig, SpecError, Stage
from .contract import ExitCode, FailureReport, StageReport, Startup, TrainerEnv, write_report
from .errors import PermanentError
from .logging import log0

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine
    from torch.nn import Module

    from .metrics import Health, TrainerMetrics
    from .model import Transformer
    from .optim import GuardedAdamW
    from .train import Trainer


def load_run_config(path: str) -> RunConfig:
    """The run config at ``path``; a :class:`PermanentError` naming the file and every problem
    in it (a person has to fix it)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise PermanentError(f"cannot read run config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise PermanentError(f"run config {path} is not valid YAML/JSON: {error}") from None
    try:
        return RunConfig.parse(raw)
    except SpecError as error:
        lines = "\n  ".join(str(p) for p in error.problems)
        raise PermanentError(f"invalid run config {path}:\n  {lines}") from None


def _single_process_defaults(environ: dict[str, str]) -> None:
    # Run without torchrun too (one process): torch.distributed still needs these.
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        environ.setdefault(name, value)
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in environ:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            environ["MASTER_PORT"] = str(probe.getsockname()[1])


def init_distributed(*, timeout_seconds: float) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPUs). DeepSpeed
    is imported here first, once its accelerator is chosen."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # Never used in training, and JIT-compiling it costs ~40 s at every start on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    endpoint = os.environ.get(contract.ENV_STORE)
    if endpoint:  # started by a worker agent: the group meets in the job's store, no rendezvous
        import torch.distributed as dist

        host, _, port = endpoint.rpartition(":")
        timeout = timedelta(seconds=timeout_seconds)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)  # type: ignore[attr-defined]
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(os.environ.get(contract.ENV_STORE_PREFIX, ""), store),  # type: ignore[attr-defined]
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
            timeout=timeout,
        )
    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_seconds), verbose=False
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def started_at(pid: int) -> float | None:
    """When process ``pid`` started (Unix time, to about 10 ms), from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    ticks = int(fields[19])  # field 22 (starttime), counted after the ")" of the command
    return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")


def launcher_started() -> float:
    """When this worker's launcher started: the moment a worker agent was told to start the
    attempt, torchrun's agent (our parent) under torchrun, else this process."""
    with contextlib.suppress(KeyError, ValueError):
        return float(os.environ[contract.ENV_LAUNCHED_AT])
    under_launcher = "TORCHELASTIC_RUN_ID" in os.environ
    found = started_at(os.getppid() if under_launcher else os.getpid())
    return found if found is not None else time.time()


def setup(env: TrainerEnv, config: RunConfig) -> Trainer:
    """Everything before the first step, each part built by the module that owns it: checks,
    the process group, what to restore, the engine, then the restore itself."""
    # torch deprecates collectives DeepSpeed still calls; one warning per call drowns the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    import torch.distributed as dist

    from .ckpt.manager import CheckpointManager
    from .ckpt.memory import MemoryTier
    from .data.loader import DataLoader
    from .dsconfig import deepspeed_config
    from .evaluate import Evaluator
    from .train import Trainer, build_model

    launcher = launcher_started()
    stage = _stage(config, env.stage)
    _single_process_defaults(os.environ)  # type: ignore[arg-type]
    # A bad config, data or storage fails here, in one line, before any peer waits on this one.
    ds_config = deepspeed_config(stage, world_size=int(os.environ["WORLD_SIZE"]))
    data = DataLoader.build(config, stage_index=env.stage)
    evaluator = Evaluator.build(config, stage_index=env.stage)
    root = Path(env.checkpoint_root or config.checkpoint.path) / env.job
    check_writable(root, name=f"rank-{os.environ['RANK']}")
    init_distributed(timeout_seconds=config.trainer.collective_timeout_seconds)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    group = time.time()
    memory = None
    if env.memory_root:
        memory = MemoryTier.build(
            Path(env.memory_root) / env.job,
            storage_root=root,
            rank=rank,
            world_size=world_size,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        )
    checkpoints = CheckpointManager.for_stage(
        config,
        stage_index=env.stage,
        root=root,
        job=env.job,
        rank=rank,
        world_size=world_size,
        memory=memory,
    )
    model = build_model(config, stage)
    checkpoints.prepare(model, ds_config)  # before DeepSpeed: it may change the engine's config
    layout = Layout.of(stage.parallelism, world_size)
    engine, optimizer, frozen = _engine(
        model, config=config, stage=stage, ds_config=ds_config, layout=layout
    )
    engine_ready = time.time()
    metrics, health = _observability(env, config)
    trainer = Trainer(
        config=config,
        stage_index=env.stage,
        engine=engine,
        optimizer=optimizer,
        data=data,
        checkpoints=checkpoints,
        metrics=metrics,
        health=health,
        rank=rank,
        world_size=world_size,
        data_rank=layout.coordinates(rank).data,
        pipelined=layout.pipeline > 1,
        evaluator=evaluator,
        step_log=Path(env.step_log) if env.step_log else None,
        attempt=env.attempt,
    )
    checkpoints.attach(engine, on_saved=trainer.on_saved)
    trainer.resume(checkpoints.load(engine, optimizer=optimizer, data=data, metrics=metrics))
    trainer.begin(
        Startup(launcher=launcher, group=group, engine=engine_ready, restored=time.time())
    )
    log0(
        f"stage {env.stage} {stage.name}: {trainer.total_steps} steps, world size {world_size}, "
        f"micro-batches per rank {_split_text(trainer.split)}, "
        f"{config.model.num_params():,} parameters ({frozen:,} frozen)"
    )
    return trainer


def _split_text(split: BatchSplit) -> str:
    """``4`` for an even split, ``3/2 (89% efficient)`` for an uneven one."""
    if split.even:
        return str(split.most)
    return f"{split.most}/{split.fewest} ({split.efficiency:.0%} efficient)"


def _engine(
    model: Transformer,
    *,
    config: RunConfig,
    stage: Stage,
    ds_config: dict[str, Any],
    layout: Layout,
) -> tuple[DeepSpeedEngine, GuardedAdamW, int]:
    """DeepSpeed's engine over ``model`` (its pipeline stage, under pipeline parallelism)
    with the stage's frozen parameters and fresh optimizer; returns it, the optimizer and how
    many parameters are frozen."""
    import deepspeed

    from .dsconfig import owns_clipping
    from .model import freeze
    from .optim import build_optimizer

    frozen = freeze(model, list(stage.freeze))  # first: the optimizer takes what still trains
    module: Module = model
    if layout.expert > 1:
        import torch.distributed as dist

        from .parallel.expert import spread_experts

        spread_experts(model, layout, rank=dist.get_rank())  # this rank's experts only
    if layout.pipeline > 1:
        from .parallel.pipeline import pipeline_module

        module = pipeline_module(model, stage, layout)  # this process's stage of it
    optimizer, scheduler = build_optimizer(
        module,
        stage=stage,
        trainer_config=config.trainer,
        total_steps=stage.total_steps(config.model),
    )
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if not owns_clipping(stage):
        optimizer.read_norm_from(engine)
    return engine, optimizer, frozen


def _stage(config: RunConfig, index: int) -> Stage:
    if index >= len(config.stages):
        raise PermanentError(f"stage index {index} out of range: {len(config.stages)} stages")
    stage = config.stages[index]
    return stage


def _observability(env: TrainerEnv, config: RunConfig) -> tuple[TrainerMetrics, Health]:
    """The process's metrics and health, served by local rank 0 when the contract gives a
    port (one endpoint per worker: every series is global)."""
    from .metrics import Health, TrainerMetrics, serve

    stage = config.stages[env.stage]
    metrics = TrainerMetrics(namespace=env.namespace, job=env.job, stage=stage.name)
    metrics.checkpoint_interval_steps.set(config.checkpoint.interval_steps)
    health = Health(step_timeout=config.trainer.step_timeout_seconds)
    if env.metrics_port is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        serve(port=env.metrics_port, metrics=metrics, health=health)
    return metrics, health


def run(env: TrainerEnv, config: RunConfig) -> int:
    import torch.distributed as dist

    from .train import Preempted

    trainer = setup(env, config)
    signal.signal(signal.SIGTERM, lambda *_: setattr(trainer, "stop_requested", True))
    try:
        final = trainer.train()
    except Preempted:
        dist.destroy_process_group()
        return ExitCode.RETRYABLE
    if trainer.rank == 0 and env.report_path:
        report = StageReport(
            job=env.job,
            stage=env.stage,
            stage_name=trainer.stage.name,
            step=trainer.progress.step,
            tokens=trainer.progress.tokens,
            loss=trainer.progress.loss,
            eval_loss=trainer.progress.eval_loss,
            skipped_steps=trainer.optimizer.skipped_steps,
            checkpoint=str(final),
            world_size=trainer.world_size,
            usage=trainer.usage(),
        )
        write_report(env.report_path, report)
    dist.barrier()
    dist.destroy_process_group()
    return ExitCode.STAGE_COMPLETE


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    del argv  # everything comes from the contract's environment
    env: TrainerEnv | None = None
    try:
        env = TrainerEnv.from_environ(os.environ if environ is None else environ)
        config = load_run_config(env.run_config)
        return run(env, config)
    except PermanentError as error:
        print(f"pretrain-trainer: permanent error: {error}", file=sys.stderr, flush=True)
        if env is not None and env.report_path:
            # torchrun (the container's process) exits 1 whatever the trainer's code was: the
            # report is how the control plane learns that retrying cannot help.
            write_report(env.report_path, FailureReport(error=str(error)))
        return ExitCode.PERMANENT
    except KeyboardInterrupt:
        return ExitCode.RETRYABLE
    except Exception:
        traceback.print_exc()
        print("pretrain-trainer: retryable failure (see the traceback above)", file=sys.stderr)
        return ExitCode.RETRYABLE
