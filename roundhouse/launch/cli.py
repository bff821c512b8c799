"""The `roundhouse` command line.

    roundhouse train JOB.yaml [key.sub=value ...] [--local] [--dry-run] [--resume latest|PATH]
    roundhouse plan JOB.yaml [key.sub=value ...] [--workers 1,2,4,8] [--device H100-80GB] [--json]
    roundhouse models list
    roundhouse models summary NAME[:FLAVOR] --input CxHxW [model.options.x=y ...]
    roundhouse schema
    roundhouse sample RUN [--sampler ddpm|ddim --steps N --guidance W --class K --num N --out F]
    roundhouse sample RUN --prompt TEXT [--max-new-tokens N --temperature T --top-k K]
    roundhouse submit JOB.yaml --address http://HEAD:8265 [key.sub=value ...] [--wait]
    roundhouse jobs list|status ID|logs ID [--follow]|stop ID [--address URL]
    roundhouse ckpt export RUN --to model.safetensors [--step N]
    roundhouse tune JOB.yaml --search KEY=EXPR ... [--samples N --scheduler asha|fifo ...]
    roundhouse runs list [STORAGE] [--name JOB] | compare RUN RUN ... | plot RUN ... --out F
    roundhouse export RUN|CKPT|JOB.yaml [--format safetensors|onnx] [--quantize int8]
        [--merge-lora] [--out PATH] [--step N]
    roundhouse ckpt export RUN --to model.safetensors [--step N]   (alias of export)

User mistakes print one line, `error: <what> (<how to fix>)`, and exit 2; `--debug` adds the
traceback. Heavy imports (torch, the trainer) happen inside the commands so `--help` is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from roundhouse.errors import JobFileError, RoundhouseError
from roundhouse.launch.cli_ckpt import add_ckpt_parser, cmd_ckpt
from roundhouse.launch.cli_data import add_data_parser, cmd_data
from roundhouse.launch.cli_export import add_export_parser, cmd_export
from roundhouse.launch.cli_jobs import add_jobs_parser, add_submit_parser, cmd_jobs, cmd_submit
from roundhouse.launch.cli_plan import add_plan_parser, cmd_plan
from roundhouse.launch.cli_runs import add_runs_parser, cmd_runs
from roundhouse.launch.cli_sample import add_sample_parser, cmd_sample
from roundhouse.launch.cli_summary import add_summary_arguments, summary_lines
from roundhouse.launch.cli_tune import add_tune_parser, cmd_tune

if TYPE_CHECKING:
    from roundhouse.config import JobSpec

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The `roundhouse` argument parser with every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument(
        "--verbose", action="store_true", help="show Ray's own notices and every worker line"
    )
    parser = argparse.ArgumentParser(
        prog="roundhouse",
        description="Distributed training: one job file, everywhere.",
        parents=[common],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(commands, common)
    add_plan_parser(commands, common)
    add_models_parser(commands, common)
    add_data_parser(commands, common)
    add_sample_parser(commands, common)
    add_submit_parser(commands, common)
    add_jobs_parser(commands, common)
    add_ckpt_parser(commands, common)
    add_tune_parser(commands, common)
    add_runs_parser(commands, common)
    add_export_parser(commands, common)
    commands.add_parser("schema", parents=[common], help="print the JSON schema of job files")
    return parser


def add_train_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add `roundhouse train` (job file, overrides, --local, --dry-run, --resume)."""
    train = commands.add_parser("train", parents=[common], help="train a job")
    train.add_argument("job", help="job file (YAML)")
    train.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override job-file values"
    )
    train.add_argument(
        "--local", action="store_true", help="run in this process on one device, no Ray"
    )
    train.add_argument("--dry-run", action="store_true", help="validate and report; train nothing")
    train.add_argument(
        "--resume", metavar="latest|PATH", help="resume the latest run, or a run/checkpoint folder"
    )
    train.add_argument(
        "--address", help="Ray cluster to run on (default: RAY_ADDRESS, else an embedded cluster)"
    )
    train.add_argument(
        "--folds", type=int, metavar="K", help="k-fold cross-validation: K runs, mean ± std"
    )


def add_models_parser(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Add `roundhouse models` (list the registry, summarize one model)."""
    models = commands.add_parser("models", parents=[common], help="the model zoo")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    sub.add_parser("list", parents=[common], help="list registered models and flavors")
    summary = sub.add_parser("summary", parents=[common], help="layer shapes and parameter counts")
    add_summary_arguments(summary)


# --- commands ----------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    """`roundhouse train`: check the job, then dry-run it or train it (locally or on Ray)."""
    from roundhouse.config.loading import load_job
    from roundhouse.launch.auto import resolve_auto
    from roundhouse.trainer.preflight import preflight

    job = load_job(args.job, args.overrides)
    if args.folds is not None:  # the command's own arguments first, before any data is read
        from roundhouse.launch.folds import check_folds

        check_folds(job, args.folds)
    job, strategy_by_size = resolve_auto(job, local=args.local)  # strategy.kind: auto
    report = preflight(job, 1 if args.local else job.cluster.num_workers)
    if args.dry_run:
        print(report.text())
        return 0
    if args.folds is not None:
        return train_folds_and_report(job, args)
    if args.local:
        from roundhouse.launch.local import train_local

        metrics = train_local(job, resume=args.resume)
    else:
        from roundhouse.launch.ray_train import train_with_ray

        metrics = train_with_ray(
            job, resume=args.resume, address=args.address, strategy_by_size=strategy_by_size
        )
    print(
        " ".join(
            f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if k.startswith(("val/", "test/"))
        )
    )
    return 0


def train_folds_and_report(job: JobSpec, args: argparse.Namespace) -> int:
    """`--folds K`: K runs on rotating validation folds; print mean ± std per metric."""
    from roundhouse.launch.folds import train_folds

    summary = train_folds(job, args.folds, local=args.local, address=args.address)
    for name, (mean, std) in summary.items():
        print(f"{name} {mean:.4f} ± {std:.4f} over {args.folds} folds")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """`roundhouse models`: list the registered models or summarize one."""
    from roundhouse import models

    if args.models_command == "list":
        for spec in models.list_models():
            print(f"{spec.name:<12} {', '.join(spec.flavors):<40} {spec.description}")
        return 0
    for line in summary_lines(args, parse_shape(args.input) if args.input else None):
        print(line)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """`roundhouse schema`: print the job file's JSON schema."""
    from roundhouse.config import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def parse_shape(text: str) -> tuple[int, ...]:
    """`3x32x32` -> (3, 32, 32); every dimension a positive integer."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise JobFileError(f"--input {text!r} is not a shape", "write it like 1x8x8 or 3x224x224")
    return shape


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train,
    "plan": cmd_plan,
    "models": cmd_models,
    "schema": cmd_schema,
    "data": cmd_data,
    "sample": cmd_sample,
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "ckpt": cmd_ckpt,
    "tune": cmd_tune,
    "runs": cmd_runs,
    "export": cmd_export,
}


def configure_logging(debug: bool) -> None:
    """Log to stderr at INFO (DEBUG with `--debug`); quiet the chatty libraries."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("urllib3", "fsspec", "filelock", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def quiet_ray(verbose: bool) -> None:
    """Ray's own notices to its log file unless `verbose` (imports no ray)."""
    from roundhouse.cluster.quiet import set_verbose

    set_verbose(verbose)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `roundhouse` console script; returns the exit code."""
    parser = build_parser()
    # Overrides may come after options (`train job.yaml --local a.b=c`): argparse leaves those
    # trailing positionals unparsed, so pick them up here.
    args, extra = parser.parse_known_args(argv)
    if (
        extra
        and (
            args.command in ("train", "submit", "plan", "tune")
            or getattr(args, "models_command", "") == "summary"
        )
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    configure_logging(args.debug)
    quiet_ray(args.verbose or args.debug)
    try:
        return COMMANDS[args.command](args)
    except RoundhouseError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)  # e.g. 143 for a preempted run
    except KeyboardInterrupt:
        print("error: interrupted (the last complete checkpoint is kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
