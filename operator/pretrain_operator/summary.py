"""A one-screen summary of a validated job: what `pretrainctl validate` prints."""

from __future__ import annotations

from pretrain_trainer.config import Stage
from rich.console import Group
from rich.text import Text

from .api import PretrainJob


def human(n: float) -> str:
    """Compact counts for people: 1.3B, 200M, 12.5K."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def _budget(stage: Stage, job: PretrainJob) -> str:
    model = job.spec.model
    steps, tokens = stage.total_steps(model), stage.tokens_per_step(model)
    shape = f"{stage.global_batch_size} seqs x {stage.seq_len_for(model)} tokens"
    if stage.budget.steps is not None:
        return f"{human(steps)} steps x {shape} = {human(steps * tokens)} tokens"
    return f"{human(stage.budget.tokens or 0)} tokens = {human(steps)} steps x {shape}"


def _world_sizes(stage: Stage, job: PretrainJob) -> list[str]:
    """Each band of worker counts: the longest rank's micro-batches, the efficiency of its
    counts, the count the planner runs and the workers' worth it trains at; under a parallel
    layout, the data-parallel degree of its counts too."""
    counts = job.spec.worker_counts(stage)
    layered = not stage.parallelism.trivial
    shown = []
    for band in counts.bands():
        best, worst = band.efficiency
        efficiency = f"{best:.0%}" if band.low == band.high else f"{best:.0%}-{worst:.0%}"
        runs = "" if band.low == band.high else f", runs {band.low}"
        dp = [counts.data_parallel(n) for n in (band.low, band.high)]
        data = f" (data parallel {dp[0]}{'' if dp[0] == dp[1] else f'-{dp[1]}'})" * layered
        shown.append(
            f"{band.counts()}{data}: {band.most} per rank, {efficiency}{runs}, "
            f"as fast as {band.useful:.4g}"
        )
    if not shown:
        shown = ["none fits"]
    if len(shown) > 6:
        shown = [*shown[:4], f"... {len(shown) - 5} more", shown[-1]]
    ranks = "data-parallel rank" if layered else "rank"
    head = f"micro batch {stage.micro_batch_size}; workers (micro-batches on the longest {ranks}):"
    return [head, *shown]


def _layout(stage: Stage, job: PretrainJob) -> str:
    layout = stage.parallelism
    per_worker = job.spec.nproc_per_worker // layout.replica
    return (
        f"{layout.describe()}: {layout.replica} process(es) per replica, "
        f"{per_worker} replica(s) per worker"
    )


def _indented(label: str, lines: list[str]) -> list[Text]:
    """The first line after ``label``, the rest indented two more under it."""
    pad = " " * (len(label) + 2)
    return [Text(label + lines[0]), *(Text(pad + line) for line in lines[1:])]


def _schedule(stage: Stage) -> str:
    schedule, lr = stage.lr_schedule, stage.optimizer.lr
    warmup = f"warmup {schedule.warmup_steps} to " if schedule.warmup_steps else ""
    if schedule.decay == "constant":
        return f"{warmup}{lr:g}, constant"
    return f"{warmup}{lr:g}, {schedule.decay} decay to {schedule.final_lr_for(lr):g}"


def _mix(stage: Stage) -> str:
    total = sum(stage.data_mix.values())
    return ", ".join(f"{name} {w / total:.0%}" for name, w in stage.data_mix.items() if w)


def _training(stage: Stage) -> str:
    parts = [
        stage.precision,
        f"ZeRO-{stage.zero_stage}",
        f"weight decay {stage.optimizer.weight_decay:g}",
        f"clip {stage.grad_clip:g}" if stage.grad_clip else "no clipping",
    ]
    if stage.dropout:
        parts.append(f"dropout {stage.dropout:g}")
    if stage.label_smoothing:
        parts.append(f"label smoothing {stage.label_smoothing:g}")
    if stage.freeze:
        parts.append("frozen " + ", ".join(stage.freeze))
    return ", ".join(parts)


def job_summary(job: PretrainJob) -> Group:
    spec, model = job.spec, job.spec.model
    kv = f" ({model.kv_head_count} kv)" if model.kv_heads else ""
    moe = f", MoE {model.moe.experts} experts top-{model.moe.top_k}" if model.moe else ""
    lines = [
        Text.assemble((job.name, "bold"), ": valid PretrainJob"),
        Text(
            f"  model     {human(model.num_params())} params: {model.layers} layers, hidden "
            f"{model.hidden}, {model.heads} heads{kv}, vocab {model.vocab_size}, "
            f"context {model.seq_len}{moe}"
        ),
        Text(
            f"  workers   {spec.elastic.min_workers}..{spec.elastic.max_count} x "
            f"{spec.nproc_per_worker} process(es); checkpoint every "
            f"{spec.checkpoint.interval_steps} steps to {spec.checkpoint.path}"
        ),
    ]
    for i, stage in enumerate(spec.stages):
        lines += [
            Text.assemble((f"  stage {i} {stage.name}", "bold cyan")),
            Text(f"    budget  {_budget(stage, job)}"),
            *(
                [Text(f"    layout  {_layout(stage, job)}")]
                if not stage.parallelism.trivial
                else []
            ),
            *_indented("    batch   ", _world_sizes(stage, job)),
            Text(f"    lr      {_schedule(stage)}"),
            Text(f"    data    {_mix(stage)}"),
            Text(f"    train   {_training(stage)}"),
        ]
    lines += [Text(f"warning: {w}", style="yellow") for w in job.warnings()]
    return Group(*lines)
