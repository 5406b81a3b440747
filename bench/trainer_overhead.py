"""Trainer overhead: our training loop vs a minimal bare DeepSpeed loop, same run, same model.

    .venv/bin/python bench/trainer_overhead.py [--nproc 2] [--steps 20] [--rounds 5]
    .venv/bin/python bench/trainer_overhead.py --parallel pipeline=2   # or tensor=2, ...

Both loops use the same model, the same generated DeepSpeed config and the same world size, in
the same processes, alternating in rounds so that machine noise hits both alike. Ours reads
real token shards through the mixture sampler, runs the stability guard, averages the loss
across ranks and updates metrics every step; the bare loop feeds pre-built tensors to
``engine(x)``, ``engine.backward``, ``engine.step``. Prints the median step time of each and
their ratio (goal: <= 1.03).

``--parallel`` gives the stage a layout (``config.parallel``); the bare loop then runs
DeepSpeed's own engine with the same layout: the same tensor-parallel config, or the same
``PipelineModule`` driven by ``engine.train_batch``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from standalone import rerun_under_torchrun


def _config(corpus: Path, args: argparse.Namespace) -> dict[str, object]:
    return {
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "heads": args.hidden // 64,
            "vocabSize": 256,
            "seqLen": args.seq_len,
        },
        "data": {"sources": [{"name": n, "path": str(corpus / n)} for n in ("code", "prose")]},
        "stages": [
            {
                "name": "bench",
                "budget": {"steps": 10**9},
                "dataMix": {"code": 1, "prose": 1},
                "globalBatchSize": args.global_batch,
                "microBatchSize": args.micro_batch,
                "precision": args.precision,
                "zeroStage": args.zero,
                "parallelism": _layout(args.parallel),
            }
        ],
        "checkpoint": {"path": str(corpus.parent / "checkpoints"), "intervalSteps": 10**9},
        "trainer": {"logEverySteps": 10**9},
    }


def _layout(text: str) -> dict[str, int]:
    """``tensor=2,pipeline=2`` as the stage's ``parallelism``."""
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    return {key: int(value) for key, value in pairs}


def launch(args: argparse.Namespace) -> int:
    from pretrain_trainer.data import build_stdlib_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        build_stdlib_corpus(corpus)
        config = Path(tmp) / "run.yaml"
        config.write_text(yaml.safe_dump(_config(corpus, args)))
        threads = max(1, (os.cpu_count() or 2) // args.nproc)
        worker = ["--worker", f"--steps={args.steps}", f"--rounds={args.rounds}"]
        worker += [f"--warmup={args.warmup}", f"--parallel={args.parallel}"]
        return rerun_under_torchrun(
            __file__, worker, nproc=args.nproc, config=config, threads=threads
        )


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    from pretrain_trainer.config import Layout
    from pretrain_trainer.contract import TrainerEnv
    from pretrain_trainer.dsconfig import deepspeed_config
    from pretrain_trainer.main import load_run_config, setup
    from pretrain_trainer.parallel.pipeline import pipeline_module
    from pretrain_trainer.train import build_model, lm_loss

    env = TrainerEnv.from_environ(os.environ)
    config = load_run_config(env.run_config)
    trainer = setup(env, config)
    stage, world = config.stages[0], dist.get_world_size()

    # The bare loop: same model, DeepSpeed config and layout, torch AdamW, tensors in memory.
    layout = Layout.of(stage.parallelism, world)
    model: torch.nn.Module = build_model(config, stage)
    if layout.pipeline > 1:
        model = pipeline_module(build_model(config, stage), stage, layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=stage.optimizer.lr)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(stage, world_size=world)
    )
    accumulation = stage.split(world).most  # the bare loop needs a world that divides
    seq = stage.seq_len_for(config.model)
    torch.manual_seed(0)  # ranks of a tensor group must read the same tokens
    tokens = torch.randint(0, 256, (accumulation, stage.micro_batch_size, seq + 1))
    batches = [(micro[:, :-1], micro[:, 1:]) for micro in tokens]

    def bare_step() -> None:
        if layout.pipeline > 1:
            engine.train_batch(data_iter=iter(batches))
            return
        for inputs, targets in batches:
            loss = lm_loss(engine(inputs), targets, label_smoothing=0.0)
            engine.backward(loss)
            engine.step()

    def timed(step: object, n: int) -> float:
        dist.barrier()
        started = time.perf_counter()
        for _ in range(n):
            step()  # type: ignore[operator]
        dist.barrier()
        return (time.perf_counter() - started) / n

    for _ in range(args.warmup):
        trainer.train_step()
        bare_step()
    ours, bare = [], []
    for _ in range(args.rounds):
        ours.append(timed(trainer.train_step, args.steps))
        bare.append(timed(bare_step, args.steps))
    if dist.get_rank() == 0:
        o, b = statistics.median(ours), statistics.median(bare)
        print(
            f"model {config.model.num_params() / 1e6:.1f}M params, world size {world}, "
            f"{stage.parallelism.describe()}, "
            f"ZeRO-{stage.zero_stage} {stage.precision}, global batch {stage.global_batch_size} "
            f"x {seq} tokens, {args.rounds} rounds x {args.steps} steps"
        )
        for name, median, rounds in (("ours", o, ours), ("bare", b, bare)):
            shown = ", ".join(f"{x * 1000:.0f}" for x in rounds)
            print(f"{name}  median step {median * 1000:8.1f} ms  (rounds: {shown})")
        print(f"ratio ours/bare = {o / b:.3f}  (goal <= 1.03)")
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--zero", type=int, default=1)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument(
        "--parallel", default="", help="the stage's layout, e.g. tensor=2 or pipeline=2"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
