"""Entry point of a trainer process (``python -m pretrain_trainer`` under torchrun).

Reads the contract (environment + run config), trains one stage and exits with a code the
control plane understands: 0 stage complete, 75 retryable, 78 permanent (bad config/data).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from .ckpt.store import StorageError
from .config import RunConfig, SpecError
from .contract import (
    ContractError,
    ExitCode,
    FailureReport,
    StageReport,
    TrainerEnv,
    write_report,
)


class PermanentError(Exception):
    """Retrying cannot help: the configuration, the data or the world size is wrong."""


def load_run_config(path: str) -> RunConfig:
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


def init_distributed(*, timeout_seconds: float) -> Any:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPUs)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    # Never used in training, and JIT-compiling it costs ~40 s at every start on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, timeout=timedelta(seconds=timeout_seconds), verbose=False
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return deepspeed


def setup(env: TrainerEnv, config: RunConfig) -> Any:
    """Everything before the first step: checks, process group, engine, restore. Returns the
    :class:`~pretrain_trainer.train.Trainer` ready to train."""
    # torch deprecates collectives DeepSpeed still calls; one warning per call drowns the log.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    import torch.distributed as dist

    from .ckpt.manager import CheckpointManager
    from .ckpt.manifest import config_hash
    from .ckpt.store import check_writable
    from .data import DataError, check_vocab, open_source
    from .dsconfig import deepspeed_config, owns_clipping
    from .logging import log0
    from .metrics import Health, TrainerMetrics, serve
    from .model import freeze
    from .optim import GuardedAdamW, param_groups
    from .train import Trainer, build_model, build_sampler

    if env.stage >= len(config.stages):
        raise PermanentError(f"stage index {env.stage} out of range: {len(config.stages)} stages")
    stage = config.stages[env.stage]
    _single_process_defaults(os.environ)  # type: ignore[arg-type]
    # Everything that can be wrong with the config or the data fails here, before the
    # process group exists: one clear line, and no peer left waiting in a collective.
    try:
        ds_config = deepspeed_config(stage, world_size=int(os.environ["WORLD_SIZE"]))
    except ValueError as error:
        raise PermanentError(str(error)) from None
    paths = {s.name: s.path for s in config.data.sources}
    sources = {}
    for name in stage.data_mix:
        try:
            sources[name] = open_source(paths[name])
            check_vocab(sources[name], config.model.vocab_size)
        except DataError as error:
            raise PermanentError(f"data source {name!r}: {error}") from None
    try:
        sampler = build_sampler(config, env.stage, sources)
    except DataError as error:
        raise PermanentError(str(error)) from None

    root = Path(env.checkpoint_root or config.checkpoint.path) / env.job
    check_writable(root, name=f"rank-{os.environ['RANK']}")

    deepspeed = init_distributed(timeout_seconds=config.trainer.collective_timeout_seconds)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    checkpoints = CheckpointManager(
        root=root,
        job=env.job,
        stage=env.stage,
        stage_name=stage.name,
        rank=rank,
        world_size=world_size,
        keep=config.checkpoint.keep,
        zero_stage=stage.zero_stage,
        config_hash=config_hash(config.model_dump(mode="json", by_alias=True)),
    )
    try:
        plan = checkpoints.plan()
    except FileNotFoundError as error:
        raise PermanentError(str(error)) from None

    model = build_model(config, stage)
    restore_seconds = 0.0
    if plan is not None and not plan.full:
        restore_seconds = plan.verify_seconds + checkpoints.load_weights(model, plan)
        log0(f"stage {stage.name} starts from the final weights of {plan.directory}")
    frozen = freeze(model, list(stage.freeze))
    optimizer = GuardedAdamW(
        param_groups(model),
        lr=stage.optimizer.lr,
        betas=stage.optimizer.betas,
        eps=stage.optimizer.eps,
        weight_decay=stage.optimizer.weight_decay,
        spike_factor=config.trainer.spike_factor,
        spike_window=config.trainer.spike_window,
        clip=stage.grad_clip if owns_clipping(stage) else 0.0,
    )
    total_steps = stage.total_steps(config.model)
    schedule, peak = stage.lr_schedule, stage.optimizer.lr

    def scheduler(opt: Any) -> Any:
        from torch.optim.lr_scheduler import LambdaLR

        return LambdaLR(
            opt, lambda step: schedule.lr_at(step, total_steps=total_steps, lr=peak) / peak
        )

    conversion = 0.0
    if plan is not None and plan.universal:
        conversion = checkpoints.convert_to_universal(plan)
        ds_config["checkpoint"] = {"load_universal": True}
        log0(
            f"{plan.directory} was written at world size {plan.manifest.world_size}; "
            f"converted to the universal format in {conversion:.1f}s"
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    if not owns_clipping(stage):
        optimizer.norm_source = lambda: getattr(engine.optimizer, "_global_grad_norm", None)

    metrics = TrainerMetrics(namespace=env.namespace, job=env.job, stage=stage.name)
    metrics.checkpoint_interval_steps.set(config.checkpoint.interval_steps)
    health = Health(step_timeout=config.trainer.step_timeout_seconds)
    if env.metrics_port is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        serve(port=env.metrics_port, metrics=metrics, health=health)

    trainer = Trainer(
        config=config,
        stage_index=env.stage,
        engine=engine,
        optimizer=optimizer,
        sampler=sampler,
        sources=sources,
        checkpoints=checkpoints,
        metrics=metrics,
        health=health,
        rank=rank,
        world_size=world_size,
        step_log=Path(env.step_log) if env.step_log else None,
    )
    checkpoints.attach(engine, on_saved=trainer.on_saved)
    if plan is not None and plan.full:
        restored = _restore(checkpoints, engine, plan, extra_seconds=conversion)
        optimizer.repair_after_load()
        trainer.resume(restored.manifest, path=restored.path)
        restore_seconds = restored.seconds
        plan = restored.plan
    if plan is not None:
        metrics.checkpoint_restore_seconds.set(restore_seconds)
        trainer.unreported_restore = restore_seconds
        if plan.full:  # a new stage starts from the last one's weights: no checkpoint of its own
            metrics.last_checkpoint_step.set(plan.manifest.step)
        with contextlib.suppress(ValueError):
            saved = datetime.fromisoformat(plan.manifest.saved_at.replace("Z", "+00:00"))
            metrics.last_checkpoint_timestamp.set(saved.timestamp())
        size = plan.manifest.total_bytes
        log0(
            f"restored {'everything' if plan.full else 'weights'} from {plan.directory}: "
            f"{size / 1e9:.3f} GB in {restore_seconds:.2f}s "
            f"({size / 1e9 / max(restore_seconds, 1e-9):.2f} GB/s; verified "
            f"{plan.bytes_verified / 1e9:.3f} GB in {plan.verify_seconds:.2f}s)"
        )
    log0(
        f"stage {env.stage} {stage.name}: {total_steps} steps, world size {world_size}, "
        f"gradient accumulation {ds_config['gradient_accumulation_steps']}, "
        f"{config.model.num_params():,} parameters ({frozen:,} frozen)"
    )
    return trainer


def _restore(checkpoints: Any, engine: Any, plan: Any, *, extra_seconds: float) -> Any:
    """Restore the newest checkpoint that loads and verifies, falling back past corrupt ones
    while the next candidate needs the same engine set-up (else restart cleanly)."""
    from .ckpt.manager import CorruptCheckpoint

    while True:
        try:
            return checkpoints.restore(engine, plan, extra_seconds=extra_seconds)
        except CorruptCheckpoint:
            previous, plan = plan, checkpoints.plan()
            if plan is None or not plan.full or plan.universal != previous.universal:
                raise RuntimeError(
                    "the newest checkpoint was corrupt and the previous one needs a fresh "
                    "start; restarting"
                ) from None


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
            skipped_steps=trainer.optimizer.skipped_steps,
            checkpoint=str(final),
            world_size=trainer.world_size,
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
    except (ContractError, PermanentError, StorageError) as error:
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
