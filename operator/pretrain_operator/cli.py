"""`pretrainctl`: the command-line entry point. Thin: parses arguments, calls the layers."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from pretrain_trainer.config import SpecError
from rich.console import Console

from . import __version__
from .api import ConditionType, Phase, PretrainJob, parse_job
from .manifests import ManifestError, read_documents

# Each command's parser sits beside its handler and adds itself here.
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
EXIT_OK = 0
EXIT_INVALID = 2


def _error(line: str) -> None:
    # Plain lines, never wrapped or styled: people grep them and tests read them.
    print(line, file=sys.stderr)


def _validate(args: argparse.Namespace, out: Console) -> int:
    status = EXIT_OK
    for path in args.files:
        try:
            docs = read_documents(Path(path))
        except ManifestError as error:
            _error(f"error: {error}")
            status = EXIT_INVALID
            continue
        for index, doc in enumerate(docs):
            where = path if len(docs) == 1 else f"{path} (document {index + 1})"
            try:
                job = parse_job(doc)
            except SpecError as error:
                _error(f"{where}: invalid PretrainJob:")
                for problem in error.problems:
                    _error(f"  {problem}")
                status = EXIT_INVALID
                continue
            if args.quiet:
                out.print(f"{where}: valid", markup=False, highlight=False)
            else:
                from .summary import job_summary

                out.print(job_summary(job))
    return status


def _validate_command(commands: Commands) -> None:
    validate = commands.add_parser(
        "validate",
        help="check PretrainJob files and summarise their stages",
        description="Exit 0 and print a summary per valid job; exit 2 listing every problem, "
        "with its field path, for an invalid one.",
    )
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("-q", "--quiet", action="store_true", help="print no summary")
    validate.set_defaults(run=_validate)


def _crd(args: argparse.Namespace, out: Console) -> int:
    from .crd import crd_yaml

    text = crd_yaml()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _crd_command(commands: Commands) -> None:
    crd = commands.add_parser("crd", help="print the PretrainJob CustomResourceDefinition")
    crd.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    crd.set_defaults(run=_crd)


def _data_prepare(args: argparse.Namespace, out: Console) -> int:
    try:  # numpy and tokenizers are trainer dependencies; `validate` must not need them
        from pretrain_trainer.data import DataError, prepare
    except ImportError as error:
        _error(
            f"error: {error}; install the trainer extra: pip install 'pretrain-operator[trainer]'"
        )
        return EXIT_INVALID
    try:
        done = prepare(
            [Path(s) for s in args.sources],
            Path(args.out),
            tokenizer=args.tokenizer,
            name=args.name,
            split_eval=args.split_eval,
        )
    except (DataError, OSError) as error:
        _error(f"error: {error}")
        return EXIT_INVALID
    skipped = done.skipped + (done.held_out.skipped if done.held_out else 0)
    if skipped:
        _error(f"warning: skipped {skipped} files that are not UTF-8 text")
    for shard, what in ((done, ""), (done.held_out, "held out: ")):
        if shard is not None:
            out.print(
                f"{what}wrote {shard.header}: {shard.tokens} tokens from {shard.files} files "
                f"(vocab {shard.vocab_size})",
                markup=False,
                highlight=False,
            )
    return EXIT_OK


def _checkpoints(args: argparse.Namespace, out: Console) -> int:
    # Torch-free: inspecting checkpoints needs only the store.
    from pretrain_trainer.ckpt import incomplete, list_checkpoints, read_latest, verify

    root = Path(args.root)
    if not root.is_dir():
        _error(f"error: {root}: no such directory")
        return EXIT_INVALID
    latest, bad = read_latest(root), 0
    for checkpoint in list_checkpoints(root):
        manifest = checkpoint.manifest
        line = (
            f"{checkpoint.name:24} {manifest.stage_name:16} tokens {manifest.tokens:>14,} "
            f"world {manifest.world_size:>4} {manifest.total_bytes / 1e9:8.3f} GB"
            f"{' final' if manifest.final else '      '}"
            f"{' <- latest' if latest == checkpoint.directory else ''}"
        )
        if args.verify:
            result = verify(checkpoint.directory, manifest)
            line += "  ok" if result.ok else "  CORRUPT: " + "; ".join(result.problems)
            bad += not result.ok
        out.print(line, markup=False, highlight=False)
    for path in incomplete(root):
        out.print(f"{path.relative_to(root)!s:24} incomplete (no manifest)", markup=False)
    return EXIT_INVALID if bad else EXIT_OK


def _checkpoints_command(commands: Commands) -> None:
    checkpoints = commands.add_parser(
        "checkpoints",
        help="list a job's checkpoints (and verify their checksums)",
        description="List the checkpoints under ROOT (<checkpoint.path>/<job>), newest first; "
        "with --verify, check every file's size and crc32 and exit 2 if any is corrupt.",
    )
    checkpoints.add_argument("root", metavar="ROOT")
    checkpoints.add_argument("--verify", action="store_true", help="check sizes and checksums")
    checkpoints.set_defaults(run=_checkpoints)


def _export(args: argparse.Namespace, out: Console) -> int:
    from pretrain_trainer.export import run

    return run(args)


def _export_command(commands: Commands) -> None:
    # Torch-free until it runs: the operator image has no torch, and says so in one line.
    from pretrain_trainer.export import add_arguments

    export = commands.add_parser(
        "export",
        help="export a checkpoint as a Hugging Face model directory",
        description="Write CHECKPOINT (<root>/<job>/stage-<s>/step-<n>) to the new directory "
        "DIR as a LlamaForCausalLM or MixtralForCausalLM: safetensors weights, config.json, "
        "generation_config.json and the tokenizer its data was prepared with, if it carries "
        "one. Checksums are verified first; a bad input is one line and exit 2, and leaves "
        "no DIR.",
    )
    add_arguments(export)
    export.set_defaults(run=_export)


def _data_stdlib(args: argparse.Namespace, out: Console) -> int:
    from pretrain_trainer.data import build_stdlib_corpus

    for name, path in build_stdlib_corpus(Path(args.out)).items():
        out.print(f"{name}: {path}", markup=False, highlight=False)
    return EXIT_OK


def _data_command(commands: Commands) -> None:
    data = commands.add_parser("data", help="prepare token shards for DataConfig.sources")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prepare = data_commands.add_parser(
        "prepare",
        help="tokenize text files into one shard",
        description="Tokenize every file of SRC (directories recursively, in sorted order; "
        "each file one document, followed by the end-of-sequence token) into the shard "
        "DIR/NAME.bin with its header DIR/NAME.json. Exit 2 with one line on error.",
    )
    prepare.add_argument("sources", nargs="+", metavar="SRC", help="text file or directory")
    prepare.add_argument("--out", required=True, metavar="DIR", help="directory of the shard")
    prepare.add_argument(
        "--tokenizer",
        default="byte",
        metavar="byte|FILE",
        help="'byte' (UTF-8 bytes, vocab 256) or a Hugging Face tokenizers JSON file",
    )
    prepare.add_argument("--name", default="tokens", help="shard name (default: tokens)")
    prepare.add_argument(
        "--split-eval",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="set this fraction of the documents aside, whole, into DIR/eval/NAME: a "
        "held-out source for data.evalSources that shares no document with DIR/NAME",
    )
    prepare.set_defaults(run=_data_prepare)
    stdlib = data_commands.add_parser(
        "stdlib",
        help="build a demo corpus from this Python's standard library (sources code, prose)",
    )
    stdlib.add_argument("--out", required=True, metavar="DIR")
    stdlib.set_defaults(run=_data_stdlib)


def _load_job(path: str) -> PretrainJob | None:
    """The job in ``path``, or None after printing why there is none."""
    from .manifests import load_job

    try:
        return load_job(Path(path))
    except ManifestError as error:
        _error(f"error: {error}")
    except SpecError as error:
        _error(f"{path}: invalid PretrainJob:")
        for problem in error.problems:
            _error(f"  {problem}")
    return None


def _run(args: argparse.Namespace, out: Console) -> int:
    from .local.display import Display, recovery_table, results_table
    from .local.runner import RunError, run

    job = _load_job(args.file)
    if job is None:
        return EXIT_INVALID
    run_dir = Path(args.dir or Path("runs") / job.name)
    # Ctrl-C, and a plain `kill`, suspend the job (workers save, checkpoints stay), even when
    # the shell that started us left SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with Display(job, run_dir, out) as display:
            status = run(
                job,
                run_dir,
                workers=args.workers,
                on_update=display.update,
                metrics_port=args.metrics_port,
            )
    except RunError as error:
        _error(f"error: {error}")
        return EXIT_INVALID
    out.print(results_table(job, status))
    recoveries = recovery_table(status)
    if recoveries is not None:
        out.print(recoveries)
    if status.phase == Phase.SUSPENDED:
        out.print(f"suspended; `pretrainctl run {args.file} --dir {run_dir}` resumes")
        return 130
    if status.phase == Phase.FAILED:
        why = next((c for c in status.conditions if c.type == ConditionType.FAILED), None)
        if why is not None:
            _error(f"failed ({why.reason}): {why.message}")
        _error(f"fix the cause, then `pretrainctl run {args.file} --dir {run_dir}` retries")
        return 1
    return EXIT_OK


def _run_command(commands: Commands) -> None:
    run = commands.add_parser(
        "run",
        help="run a PretrainJob on this machine, to the end",
        description="Run every stage of the job with local worker processes (torchrun + "
        "DeepSpeed), restarting and resizing on worker loss. Ctrl-C suspends; running the "
        "same command again resumes.",
    )
    run.add_argument("file", metavar="FILE")
    run.add_argument("--workers", type=int, help="worker slots (default: elastic.maxWorkers)")
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the job's Prometheus series on PORT and worker slot s's trainer on "
        "PORT+1+s (127.0.0.1)",
    )
    run.add_argument("--dir", help="run directory (default: runs/<job>)")
    run.set_defaults(run=_run)


def _workers(args: argparse.Namespace, out: Console) -> int:
    from .local.backend import read_capacity, write_capacity

    run_dir = Path(args.dir)
    capacity, down = read_capacity(run_dir)
    if capacity == 0:
        _error(f"error: {run_dir} is not a local run directory (no capacity.json)")
        return EXIT_INVALID
    if args.action == "kill":
        alive = [s for s in range(capacity) if s not in down]
        slot = args.slot if args.slot is not None else (alive[-1] if alive else None)
        if slot is None or slot in down or slot >= capacity:
            _error(f"error: no running worker slot {slot} to kill")
            return EXIT_INVALID
        down.add(slot)
        out.print(f"worker {slot} killed (its slot stays down until `workers add`)")
    else:
        if down:
            slot = min(down) if args.slot is None else args.slot
            down.discard(slot)
        else:
            capacity += 1
            slot = capacity - 1
        out.print(f"worker slot {slot} available")
    write_capacity(run_dir, capacity, down)
    return EXIT_OK


def _workers_command(commands: Commands) -> None:
    workers = commands.add_parser(
        "workers", help="simulate losing or gaining a worker in a local run"
    )
    workers.add_argument("action", choices=["kill", "add"])
    workers.add_argument("--dir", required=True, help="the run directory")
    workers.add_argument("--slot", type=int, help="which slot (default: the last / first down)")
    workers.set_defaults(run=_workers)


def _render(args: argparse.Namespace, out: Console) -> int:
    from .kube.objects import Gang, Options
    from .kube.render import RenderError, render, to_yaml

    job = _load_job(args.file)
    if job is None:
        return EXIT_INVALID
    try:
        gang = Gang(None if args.gang == "none" else args.gang)
        objects = render(
            job,
            namespace=args.namespace,
            stage=args.stage,
            workers=args.workers,
            options=Options(gang=gang),
        )
    except RenderError as error:
        _error(f"error: {error}")
        return EXIT_INVALID
    sys.stdout.write(to_yaml(objects))
    return EXIT_OK


def _render_command(commands: Commands) -> None:
    render = commands.add_parser(
        "render",
        help="print the objects the operator would create for a job's stage",
        description="Print, as YAML documents, the ServiceAccount, Service, ConfigMap, "
        "rendezvous pod and worker pods the operator creates for one stage of the job "
        "(a first attempt at the largest usable group): a dry run to read or to pipe to "
        "`kubectl apply -f -`.",
    )
    render.add_argument("file", metavar="FILE")
    render.add_argument("--namespace", default="default")
    render.add_argument("--stage", type=int, default=0, help="stage index (default: 0)")
    render.add_argument("--workers", type=int, help="workers (default: elastic.maxWorkers)")
    render.add_argument(
        "--gang",
        choices=["none", "volcano", "coscheduling"],
        default="none",
        help="add the PodGroup of this gang scheduler",
    )
    render.set_defaults(run=_render)


def _operator(args: argparse.Namespace, out: Console) -> int:
    import os

    from .kube.settings import OperatorSettings, SettingsError

    try:
        settings = OperatorSettings.from_environ(os.environ)
    except SettingsError as error:
        _error(f"error: {error}")
        return EXIT_INVALID
    from .kube.handlers import run

    run(settings)
    return EXIT_OK


def _operator_command(commands: Commands) -> None:
    operator = commands.add_parser(
        "operator",
        help="run the Kubernetes operator (in its Deployment)",
        description="Serve PretrainJobs until stopped. Settings come from the environment: "
        "PRETRAIN_OPERATOR_NAMESPACES (comma-separated; empty: the whole cluster), "
        "_RESYNC_SECONDS, _METRICS_PORT, _HEALTH_PORT, _PEERING, _STANDALONE, "
        "_GANG_SCHEDULER (none|volcano|coscheduling), _STANDBY_PRIORITY_CLASS, _WATCH_NODES.",
    )
    operator.set_defaults(run=_operator)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="pretrainctl",
        description="Elastic multi-stage pretraining on Kubernetes or on this machine.",
    )
    root.add_argument("--version", action="version", version=f"pretrainctl {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _validate_command,
        _crd_command,
        _data_command,
        _checkpoints_command,
        _export_command,
        _run_command,
        _workers_command,
        _render_command,
        _operator_command,
    ):
        add(commands)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Console(soft_wrap=True)
    try:
        return int(args.run(args, out))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
