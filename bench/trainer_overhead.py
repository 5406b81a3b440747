"""Trainer overhead: our training loop vs a minimal bare DeepSpeed loop, same run, same model.

    .venv/bin/python bench/trainer_overhead.py [--nproc 2] [--steps 20] [--rounds 5]
    .venv/bin/python bench/trainer_overhead.py --parallel pipeline=2   # or tensor=2, ...
    .venv/bin/python bench/trainer_overhead.py --parallel expert=2 --experts 4

Both loops use the same model, the same generated DeepSpeed config and the same world size, in
the same processes, alternating in rounds so that machine noise hits both alike. Ours reads
real token shards through the mixture sampler, runs the stability guard, averages the loss
across ranks and updates metrics every step; the bare loop feeds the same stream's first
steps, read ahead into memory, to ``engine(x)``, ``engine.backward``, ``engine.step``.
Prints the median step time of each and their ratio (goal: <= 1.03).

``--parallel`` gives the stage a layout (``config.parallel``); the bare loop then runs
DeepSpeed's own engine with the same layout: the same tensor-parallel config, the same
``PipelineModule`` driven by ``engine.train_batch``, or the same DeepSpeed MoE layers.
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
            **({"moe": {"experts": args.experts, "topK": 2}} if args.experts else {}),
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
    from pretrain_trainer.data.loader import DataLoader
    from pretrain_trainer.dsconfig import deepspeed_config
    from pretrain_trainer.main import load_run_config, setup
    from pretrain_trainer.optim import param_groups
    from pretrain_trainer.parallel.expert import spread_experts
    from pretrain_trainer.parallel.pipeline import pipeline_module
    from pretrain_trainer.train import build_model, lm_loss

    env = TrainerEnv.from_environ(os.environ)
    config = load_run_config(env.run_config)
    trainer = setup(env, config)
    stage, world = config.stages[0], dist.get_world_size()

    # The bare loop: same model, DeepSpeed config and layout, torch AdamW, tensors in memory.
    layout = Layout.of(stage.parallelism, world)
    whole = build_model(config, stage)
    if layout.expert > 1:
        spread_experts(whole, layout, rank=dist.get_rank())
    model = pipeline_module(whole, stage, layout) if layout.pipeline > 1 else whole
    optimizer = torch.optim.AdamW(param_groups(model), lr=stage.optimizer.lr)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(stage, world_size=world)
    )
    seq = stage.seq_len_for(config.model)
    # The same token stream as ours (an MoE's routing, and so its step time, depends on the
    # tokens), read ahead of time: the first steps' micro-batches of this data-parallel rank.
    stream = DataLoader.build(config, stage_index=0)
    split, device = stage.split(world), engine.device
    ahead = [
        stream.next_batch(rank=trainer.data_rank, split=split, device=device)
        for _ in range(args.steps)
    ]
    step_index = iter(range(10**9))

    coef = config.model.moe.aux_loss_coef if config.model.moe else 0.0

    def bare_step() -> None:
        batches = ahead[next(step_index) % len(ahead)]
        if layout.pipeline > 1:
            engine.train_batch(data_iter=iter(batches))
            return
        for inputs, targets in batches:
            loss = lm_loss(engine(inputs), targets, label_smoothing=0.0)
            if coef:  # the balance loss, as any MoE loop adds it
                loss = loss + coef * engine.module.aux_loss()
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
    parser.add_argument("--experts", type=int, default=0, help="an MoE model of this many")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
