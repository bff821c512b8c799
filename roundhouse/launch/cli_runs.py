"""`roundhouse runs list|compare|plot`: run folders as a table, side by side, or as curves.

    roundhouse runs list [STORAGE] [--name JOB]
    roundhouse runs compare RUN RUN ... [--storage STORAGE]
    roundhouse runs plot RUN ... --metrics train/loss,val/accuracy --out curves.png [--x step|time]
    roundhouse runs verify RUN [--json]   (the sample ledger: exit 1 on a duplicate or a miss)

A RUN is a run folder (path or URL) or a run id found under `--storage` (default ./runs).
"""

from __future__ import annotations

import argparse
from typing import Any

from roundhouse.runs.reader import (
    RunRecord,
    RunsError,
    default_val_metric,
    differing_keys,
    flatten,
    list_runs,
    resolve_run,
)

DEFAULT_STORAGE = "./runs"


def add_runs_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `runs` command (list, compare, plot) to the CLI's subcommands."""
    runs = commands.add_parser("runs", parents=[common], help="list, compare and plot runs")
    sub = runs.add_subparsers(dest="runs_command", required=True, metavar="SUBCOMMAND")
    listing = sub.add_parser("list", parents=[common], help="a table of the runs under STORAGE")
    listing.add_argument("storage", nargs="?", default=DEFAULT_STORAGE)
    listing.add_argument("--name", help="only runs of this job")
    compare = sub.add_parser("compare", parents=[common], help="runs side by side")
    compare.add_argument("runs", nargs="+", metavar="RUN")
    compare.add_argument("--storage", default=DEFAULT_STORAGE, help="where run ids are looked up")
    plot = sub.add_parser("plot", parents=[common], help="metric curves of runs as a PNG")
    plot.add_argument("runs", nargs="+", metavar="RUN")
    plot.add_argument("--metrics", default="train/loss,val/accuracy", help="comma-separated")
    plot.add_argument("--out", default="curves.png", help="PNG file to write")
    plot.add_argument("--x", choices=("step", "time"), default="step", help="x axis")
    plot.add_argument("--storage", default=DEFAULT_STORAGE, help="where run ids are looked up")
    verify = sub.add_parser("verify", parents=[common], help="check a run's sample ledger")
    verify.add_argument("run", metavar="RUN")
    verify.add_argument("--storage", default=DEFAULT_STORAGE, help="where run ids are looked up")
    verify.add_argument("--json", action="store_true", help="the report as JSON on stdout")


def cmd_runs(args: argparse.Namespace) -> int:
    """Run one `runs` subcommand and print its table (or the PNG written)."""
    if args.runs_command == "verify":
        return cmd_verify(args)
    if args.runs_command == "list":
        lines = list_table(list_runs(args.storage, args.name))
    elif args.runs_command == "compare":
        lines = compare_table([resolve_run(r, args.storage) for r in args.runs])
    else:
        from roundhouse.launch.runs_plot import plot_runs

        runs = [resolve_run(r, args.storage) for r in args.runs]
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
        lines = [f"wrote {plot_runs(runs, metrics, args.out, x=args.x)}"]
    for line in lines:
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`runs verify RUN`: per-epoch duplicate and missing counts; 1 when any is non-zero."""
    import json

    from roundhouse.runs.ledger import verify_ledger
    from roundhouse.runs.rundir import RunDir

    report = verify_ledger(RunDir(resolve_run_url(args.run, args.storage)))
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0 if report.ok else 1
    table = [["epoch", "steps", "trained", "duplicates", "missing"]]
    for e in report.epochs:
        table.append([str(v) for v in (e.epoch, e.steps, e.trained, e.duplicates, e.missing)])
    for line in align(table):
        print(line)
    verdict = "ok" if report.ok else "FAILED"
    print(f"{verdict}: {report.duplicates} duplicates, {report.missing} missing")
    return 0 if report.ok else 1


def resolve_run_url(ref: str, storage: str) -> str:
    """The folder URL of a run named by its path/URL or its run id under `storage`."""
    from roundhouse.runs.ledger import LEDGER, META
    from roundhouse.runs.rundir import RunDir

    if RunDir(ref).exists(LEDGER, META):
        return ref
    return resolve_run(ref, storage).url


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, None as a dash."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def fmt_duration(seconds: float | None) -> str:
    """Seconds as `M:SS` or `H:MM:SS` (None as a dash)."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def align(table: list[list[str]]) -> list[str]:
    """Rows of cells as left-aligned text columns."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table
    ]


def list_table(runs: list[RunRecord]) -> list[str]:
    """run id, job, strategy, workers, status, steps, best val metric, duration."""
    if not runs:
        return ["no runs"]
    table = [["run", "job", "strategy", "workers", "status", "steps", "best val", "duration"]]
    for run in runs:
        metric = default_val_metric(run)
        best = f"{metric} {fmt(run.best(metric))}" if metric else "-"
        table.append(
            [
                run_label(run),
                run.name,
                run.strategy,
                str(run.workers),
                run.status,
                str(run.steps),
                best,
                fmt_duration(run.duration_s),
            ]
        )
    return align(table)


def run_label(run: RunRecord) -> str:
    """The run id, with its sweep or fold group (`tune-<id>/<trial>`) when it has one."""
    run_id = (run.job.get("storage") or {}).get("run_id")
    return str(run_id) if run_id else run.run_id


def compare_table(runs: list[RunRecord]) -> list[str]:
    """Differing job keys, then the final and best value of every metric, one column a run."""
    if len(runs) < 2:
        raise RunsError("runs compare needs at least two runs", "pass two or more RUNs")
    table = [["", *(run_label(r) for r in runs)]]
    flat = [flatten(r.job) for r in runs]
    for key in differing_keys(runs):
        table.append([key, *(fmt(f.get(key)) for f in flat)])
    table.append(["status", *(r.status for r in runs)])
    table.append(["steps", *(str(r.steps) for r in runs)])
    metrics = sorted({m for r in runs for m in r.metric_names()})
    for metric in metrics:
        if metric.startswith(("val/", "test/")) or metric == "train/loss":
            table.append([f"final {metric}", *(fmt(r.final(metric)) for r in runs)])
            if not metric.startswith("test/"):
                table.append([f"best {metric}", *(fmt(r.best(metric)) for r in runs)])
    return align(table)
