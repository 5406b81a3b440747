"""Checkpoint benchmarks: save blocking time and restore time, each against a baseline in the
same run.

    .venv/bin/python bench/checkpoint_bench.py save     [--params 100M] [--nproc 2]
    .venv/bin/python bench/checkpoint_bench.py restore  [--params 100M] [--nproc 2]

save:    the time training is blocked by our save (the call, plus what the next optimizer step
         waits for: the state is written while that step's forward and backward run) vs a
         synchronous DeepSpeed ``save_checkpoint`` of the same state (goal: ratio <= 0.02),
         the run's first save apart; also how much slower the step after a save is, the
         write sharing the CPU. ``--memory DIR`` writes through the in-memory tier there.
restore: our restore (rank 0 verifies sizes and checksums, every rank loads through DeepSpeed
         with memory-mapped files) vs ``cat`` of the same files to /dev/null, both with the files
         in the page cache (goal: ratio <= 1.3), and the projection to a 67B-parameter model at a
         given disk bandwidth.
Model sizes: ``--params 100M`` (hidden 768, 12 layers) or ``300M`` (hidden 1024, 24 layers),
ZeRO-1 fp32 on CPU processes.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from standalone import rerun_under_torchrun

SIZES = {"100M": (12, 768, 32768), "300M": (24, 1024, 32768)}


def _config(corpus: Path, ckpt: Path, size: str) -> dict[str, object]:
    layers, hidden, vocab = SIZES[size]
    return {
        "model": {
            "layers": layers,
            "hidden": hidden,
            "heads": hidden // 64,
            "vocabSize": vocab,
            "seqLen": 64,
        },
        "data": {"sources": [{"name": n, "path": str(corpus / n)} for n in ("code", "prose")]},
        "stages": [
            {
                "name": "bench",
                "budget": {"steps": 10**6},
                "dataMix": {"code": 1, "prose": 1},
                "globalBatchSize": 2,
                "microBatchSize": 1,
                "precision": "fp32",
                "zeroStage": 1,
            }
        ],
        "checkpoint": {"path": str(ckpt), "intervalSteps": 10**6, "keep": 100},
        "trainer": {"logEverySteps": 10**6},
    }


def launch(args: argparse.Namespace) -> int:
    from pretrain_trainer.data import build_stdlib_corpus

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        corpus, ckpt = Path(tmp) / "corpus", Path(tmp) / "checkpoints"
        build_stdlib_corpus(corpus, max_files=200)
        config = Path(tmp) / "run.yaml"
        config.write_text(yaml.safe_dump(_config(corpus, ckpt, args.params)))
        worker = [
            args.what,
            "--worker",
            f"--rounds={args.rounds}",
            f"--bandwidth={args.bandwidth}",
            f"--cache={args.cache}",
            f"--nodes={args.nodes}",
        ]
        if args.memory:
            os.environ["PRETRAIN_MEMORY_ROOT"] = args.memory
        return rerun_under_torchrun(__file__, worker, nproc=args.nproc, config=config, threads=1)


def _drop_caches(rank: int) -> bool:
    """Empty the page cache (needs root) so both contenders read from disk; False if not allowed."""
    import torch.distributed as dist

    ok = True
    if rank == 0:
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            ok = False
    box = [ok]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def _cat(paths: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
    from pretrain_trainer.ckpt.catalog import list_checkpoints
    from pretrain_trainer.ckpt.restore import broadcast, choose
    from pretrain_trainer.contract import TrainerEnv
    from pretrain_trainer.main import load_run_config, setup

    env = TrainerEnv.from_environ(os.environ)
    trainer = setup(env, load_run_config(env.run_config))
    rank, manager, engine = trainer.rank, trainer.checkpoints, trainer.engine
    trainer.train_step()
    params = trainer.config.model.num_params()

    def barrier_timed(action: object) -> float:
        dist.barrier()
        started = time.perf_counter()
        action()  # type: ignore[operator]
        dist.barrier()
        return time.perf_counter() - started

    if args.what == "save":

        def blocked() -> float:
            return trainer.usage().blocking_seconds

        def step_timed() -> float:
            dist.barrier()
            started = time.perf_counter()
            trainer.train_step()
            dist.barrier()
            return time.perf_counter() - started

        plain = [step_timed() for _ in range(args.rounds)]  # steps without a save
        rounds: list[tuple[float, float]] = []  # (blocking, the step after the save)
        sync, durable = [], []
        ours_engine = engine.checkpoint_engine
        for round_ in range(args.rounds + 1):  # round 0 is the run's first save
            before = blocked()
            barrier_timed(trainer.save)  # returns at once: the state is written meanwhile
            after_step = step_timed()  # its optimizer step waits for what is unwritten
            rounds.append((blocked() - before, after_step))
            manager.wait()
            dist.barrier()
            if round_ == 0:
                continue
            engine.checkpoint_engine = TorchCheckpointEngine()
            target = manager.root / "sync"
            save = functools.partial(engine.save_checkpoint, str(target), tag=f"r{round_}")
            sync.append(barrier_timed(save))
            durable.append(sync[-1] + barrier_timed(os.sync))  # on disk, as ours ends up
            engine.checkpoint_engine = ours_engine
            if rank == 0:
                shutil.rmtree(target, ignore_errors=True)
        if rank == 0:
            first, later = rounds[0], rounds[1:]
            o = statistics.median(b for b, _ in later)
            s, d = statistics.median(sync), statistics.median(durable)
            base = statistics.median(plain)
            slower = statistics.median(t for _, t in later) - base
            size = list_checkpoints(manager.root)[0].manifest.total_bytes / 1e9
            tier = "memory tier, then storage" if manager.memory is not None else "storage"
            print(
                f"model {params / 1e6:.0f}M params, {dist.get_world_size()} processes, "
                f"ZeRO-1 fp32, checkpoint {size:.2f} GB ({tier}), {args.rounds} rounds"
            )
            shown = ", ".join(f"{b:.4f}" for b, _ in later)
            print(f"blocking (ours)        {o:8.4f} s   rounds {shown}")
            print(f"  first save of a run  {first[0]:8.4f} s")
            print(
                f"synchronous DeepSpeed  {s:8.4f} s   rounds {', '.join(f'{x:.3f}' for x in sync)}"
            )
            print(f"synchronous + fsync    {d:8.4f} s")
            print(
                f"step {base:.3f} s without a save; the step after one {base + slower:.3f} s "
                f"(+{slower:.3f} s: the write shares the CPU with the step)"
            )
            print(
                f"ratio blocking/sync = {o / s:.4f}, first save/sync = {first[0] / s:.4f}, "
                f"blocking/durable sync = {o / d:.4f}  (goal <= 0.02)"
            )
    else:
        trainer.save()
        manager.wait()
        dist.barrier()
        restores, raws, recalls = [], [], []
        cold = args.cache == "cold" and _drop_caches(rank)
        stored = broadcast(
            choose(manager.root, stage=manager.stage, world_size=manager.world_size)
            if rank == 0
            else None
        )  # storage's copy, whatever the memory tier holds
        for _ in range(args.rounds):
            if cold:
                _drop_caches(rank)
            restores.append(barrier_timed(lambda: manager.restore(engine, stored)))
            files = [stored.directory / f.path for f in stored.manifest.files]
            if cold:
                _drop_caches(rank)
            raws.append(_cat(files) if rank == 0 else 0.0)
            if manager.memory is not None:  # the same state, from the workers' memory
                recalls.append(barrier_timed(lambda: manager.restore(engine, manager.select())))
        plan = manager.select()  # collective: every rank takes part
        if rank == 0:
            assert plan is not None
            size = plan.manifest.total_bytes
            r, w = statistics.median(restores), statistics.median(raws)
            big = 67e9 * (size / params)
            state = "read from disk: page cache dropped" if cold else "files in the page cache"
            print(
                f"model {params / 1e6:.0f}M params, {dist.get_world_size()} processes, "
                f"ZeRO-1 fp32, checkpoint {size / 1e9:.2f} GB ({state}), {args.rounds} rounds"
            )
            print(f"restore (verify + load)  {r:7.3f} s  ({size / 1e9 / r:.2f} GB/s)")
            print(f"raw read (cat)           {w:7.3f} s  ({size / 1e9 / w:.2f} GB/s)")
            print(f"ratio restore/raw = {r / w:.2f}  (goal <= 1.3)")
            if recalls:
                m = statistics.median(recalls)
                print(f"restore from the memory tier {m:7.3f} s  ({size / 1e9 / m:.2f} GB/s)")
                print(f"ratio memory/storage restore = {m / r:.3f}  (goal <= 0.2)")
            aggregate = args.bandwidth * args.nodes
            print(
                f"projection, 67B params: {big / 1e9:.0f} GB at this model's bytes/param, "
                f"read by {args.nodes} nodes at {args.bandwidth:g} GB/s each: "
                f"{big / (aggregate * 1e9) * (r / w):.0f} s (raw read x the measured ratio)"
            )
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["save", "restore"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--params", choices=sorted(SIZES), default="100M")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", choices=["cold", "warm"], default="cold")
    parser.add_argument("--bandwidth", type=float, default=2.0, help="GB/s per node (projection)")
    parser.add_argument("--nodes", type=int, default=64, help="nodes reading (projection)")
    parser.add_argument("--memory", default=None, help="in-memory tier (e.g. /dev/shm/bench)")
    parser.add_argument("--dir", default=None, help="where to write checkpoints (default: /tmp)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
