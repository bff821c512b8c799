"""`roundhouse tune JOB.yaml --search KEY=EXPR ...`: a hyperparameter sweep on Ray Tune.

Everything the user can get wrong (search keys and expressions, the metric, the searcher) is
checked here before Ray starts; `cluster/tune.py` runs the sweep.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
from typing import Any

import yaml

from roundhouse.config import JobSpec
from roundhouse.launch.search_space import (
    SearchError,
    SearchParam,
    apply_params,
    check_metric,
    check_params,
    check_searcher,
    grid_size,
    parse_search,
)

logger = logging.getLogger(__name__)

SWEEP_PREFIX = "tune-"
BEST_JOB, RESULTS = "best.yaml", "results.tsv"


def add_tune_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `tune` command to the CLI's subcommands."""
    tune = commands.add_parser("tune", parents=[common], help="a hyperparameter sweep (Ray Tune)")
    tune.add_argument("job", help="job file (YAML)")
    tune.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override job values")
    tune.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=EXPR",
        help="searched key: uniform(lo,hi) loguniform(lo,hi) randint(lo,hi) choice(..) grid(..)",
    )
    tune.add_argument("--samples", type=int, help="trials (grid: repeats of the grid); default 8")
    tune.add_argument("--scheduler", choices=("asha", "fifo"), default="asha")
    tune.add_argument("--searcher", choices=("random", "grid", "bayes"), default="random")
    tune.add_argument("--metric", default="val/loss", help="validation metric to optimize")
    tune.add_argument("--mode", choices=("min", "max"), help="default: min for losses, else max")
    tune.add_argument("--grace-period", type=int, default=1, help="ASHA: evaluations first")
    tune.add_argument("--reduction-factor", type=int, default=3, help="ASHA: keep 1 in this")
    tune.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else embedded)")
    tune.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="latest|tune-ID|PATH",
        help="resume a sweep whose driver was stopped (default: the latest of this job)",
    )


def parse_params(args: argparse.Namespace, job: JobSpec) -> list[SearchParam]:
    """The `--search` parameters, checked against the job and the searcher."""
    if not args.search:
        raise SearchError("nothing to search", "add --search KEY=EXPR (see roundhouse tune -h)")
    params = [parse_search(text) for text in args.search]
    check_params(job, params)
    check_searcher(args.searcher, params)
    check_metric(job, args.metric)
    if args.searcher == "bayes" and importlib.util.find_spec("optuna") is None:
        raise SearchError(
            "--searcher bayes needs optuna, which is not installed", "pip install optuna"
        )
    if args.samples is not None and args.samples < 1:
        raise SearchError(f"--samples {args.samples} must be at least 1", "e.g. --samples 8")
    return params


def count_evaluations(job: JobSpec) -> int:
    """Evaluations a full run makes: one per epoch end, plus every `eval_every_steps`."""
    from roundhouse.cluster.progress import estimate_total_steps

    cfg = job.trainer
    if cfg.eval_every_steps is None and cfg.max_steps is None and cfg.max_epochs is not None:
        return cfg.max_epochs
    total = estimate_total_steps(job) or cfg.max_steps or 1
    per_steps = total // cfg.eval_every_steps if cfg.eval_every_steps else 0
    return max(1, per_steps + (cfg.max_epochs or 1))


def resolve_mode(metric: str, mode: str | None) -> str:
    """`--mode`, or min for losses and max otherwise when it is not given."""
    from roundhouse.runs.reader import lower_is_better

    return mode or ("min" if lower_is_better(metric) else "max")


def sweep_folder(job: JobSpec, resume: str | None) -> tuple[str, str]:
    """(url, id) of the sweep folder: a new `tune-<id>`, or the one `--resume` names."""
    from roundhouse.runs.rundir import RunDir, new_run_id
    from roundhouse.trainer.run import job_folder

    parent = job_folder(job)
    if resume is None:
        sweep_id = SWEEP_PREFIX + new_run_id()
        return f"{parent.url}/{sweep_id}", sweep_id
    if resume == "latest":
        sweeps = [n for n in parent.listdir() if n.startswith(SWEEP_PREFIX)]
        if not sweeps:
            raise SearchError(f"no sweep under {parent.url} to resume", "run it without --resume")
        return f"{parent.url}/{sweeps[-1]}", sweeps[-1]
    if "/" not in resume and resume.startswith(SWEEP_PREFIX):
        return f"{parent.url}/{resume}", resume
    folder = RunDir(resume)
    return folder.url, folder.url.rsplit("/", 1)[-1]


def cmd_tune(args: argparse.Namespace) -> int:
    """Run the sweep (or the k-fold runs) and print the results table and the best job file."""
    from roundhouse.cluster.runtime import ray_runtime
    from roundhouse.cluster.services import service_cpus
    from roundhouse.cluster.tune import SweepPlan, apply_sweep_env, run_sweep
    from roundhouse.launch.checks import check_runnable
    from roundhouse.launch.jobfile import load_job
    from roundhouse.trainer.run import with_absolute_storage

    job = with_absolute_storage(load_job(args.job, args.overrides))
    params = parse_params(args, job)
    check_runnable(job, local=False)
    url, sweep_id = sweep_folder(job, args.resume)
    samples = args.samples or (1 if grid_size(params) > 1 or args.searcher == "grid" else 8)
    plan = SweepPlan(
        job=job,
        sweep_url=url,
        sweep_id=sweep_id,
        params=params,
        metric=args.metric,
        mode=resolve_mode(args.metric, args.mode),
        samples=samples,
        scheduler=args.scheduler,
        searcher=args.searcher,
        max_t=count_evaluations(job),
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        verbose=args.verbose,
    )
    logger.info(
        "sweep folder: %s (%d trial(s), %s)", url, samples * grid_size(params), args.scheduler
    )
    apply_sweep_env()
    with ray_runtime(job.cluster, args.address, extra_cpus=service_cpus(job) + 1):
        results = run_sweep(plan, resume=args.resume is not None)
    rows = summarize(results, plan)
    check_some_trial_ran(results, rows)
    for line in format_table(rows, plan):
        print(line)
    best = write_outcome(rows, plan)
    print(f"best job: {best}" if best else "no trial reported the metric")
    return 0


def summarize(results: Any, plan: Any) -> list[dict[str, Any]]:
    """One row per trial, read back from its run folder: values, status, evaluations,
    best and last metric, the test metric. Trials the scheduler stopped are marked so."""
    from roundhouse.runs.reader import read_run
    from roundhouse.runs.rundir import RunDir
    from roundhouse.runs.status import RUNNING, STOPPED, write_status

    rows = []
    for result in results:
        trial = result.path.rstrip("/").rsplit("/", 1)[-1]
        folder = RunDir(f"{plan.sweep_url}/{trial}")
        run = read_run(folder.url) if folder.exists("job.yaml") else None
        status = "error" if result.error else (run.status if run else "-")
        if run is not None and (run.status_record or {}).get("status") == RUNNING:
            status = STOPPED  # the scheduler ended it early
            kept = {k: v for k, v in run.status_record.items() if k in ("started", "world_size")}
            write_status(folder, status, **kept)
        values = [v for _, _, v in run.series(plan.metric)] if run else []
        best = (min if plan.mode == "min" else max)(values) if values else None
        test = plan.metric.replace("val/", "test/", 1)
        rows.append(
            {
                "trial": trial,
                "config": {p.key: (result.config or {}).get(p.key) for p in plan.params},
                "status": status,
                "evals": len(values),
                "last": values[-1] if values else None,
                "best": best,
                "test": run.final(test) if run else None,
            }
        )
    rows.sort(key=lambda r: _rank_key(r, plan.mode))
    return rows


def check_some_trial_ran(results: Any, rows: list[dict[str, Any]]) -> None:
    """Every trial failing is the job's fault, not a search result: say why, exit 2."""
    from roundhouse.cluster.workers import unwrap_worker_error

    if not rows or any(r["status"] != "error" for r in rows):
        return
    error = next(r.error for r in results if r.error)
    raise unwrap_worker_error(error) from error


def _rank_key(row: dict[str, Any], mode: str) -> float:
    best = row["best"]
    if best is None or not math.isfinite(best):
        return math.inf
    return best if mode == "min" else -best


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table_cells(rows: list[dict[str, Any]], plan: Any) -> list[list[str]]:
    """The results table as cells, header first, best trial next."""
    keys = [p.key for p in plan.params]
    test = plan.metric.replace("val/", "test/", 1)
    header = ["trial", *keys, "status", "evals", f"best {plan.metric}", f"last {plan.metric}", test]
    table = [header]
    for row in rows:
        table.append(
            [
                row["trial"],
                *(_fmt(row["config"][k]) for k in keys),
                row["status"],
                str(row["evals"]),
                _fmt(row["best"]),
                _fmt(row["last"]),
                _fmt(row["test"]),
            ]
        )
    return table


def format_table(rows: list[dict[str, Any]], plan: Any) -> list[str]:
    """The results table as aligned text lines."""
    table = table_cells(rows, plan)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]


def write_outcome(rows: list[dict[str, Any]], plan: Any) -> str | None:
    """`results.tsv` and the best trial's resolved job (`best.yaml`) in the sweep folder."""
    from roundhouse.runs.rundir import RunDir
    from roundhouse.runs.tracking import redact_secrets

    folder = RunDir(plan.sweep_url)
    cells = table_cells(rows, plan)
    folder.write_text(RESULTS, "".join("\t".join(r) + "\n" for r in cells))
    if not rows or rows[0]["best"] is None:
        return None
    best = apply_params(plan.job, rows[0]["config"])
    data = redact_secrets(best.model_dump(mode="json"))
    header = (
        f"# best trial {rows[0]['trial']} of {plan.sweep_id}: {plan.metric} {rows[0]['best']:.4g}\n"
    )
    folder.write_text(BEST_JOB, header + yaml.safe_dump(data, sort_keys=False))
    return folder.url_of(BEST_JOB)
