"""`roundhouse tune JOB.yaml --search KEY=EXPR ...`: a hyperparameter sweep on Ray Tune.

The command only: everything the user can get wrong (search keys and expressions, the metric,
the searcher, and the job itself through the pre-flight) is checked before Ray starts; the
sweep room, `roundhouse/cluster/sweep/`, holds the search space, the Ray Tune driver and the
results table.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging

from roundhouse.cluster.sweep.results import (
    check_some_trial_ran,
    count_evaluations,
    format_table,
    resolve_mode,
    summarize,
    sweep_folder,
    write_outcome,
)
from roundhouse.cluster.sweep.space import (
    SearchError,
    SearchParam,
    check_metric,
    check_params,
    check_searcher,
    grid_size,
    parse_search,
)
from roundhouse.config import JobSpec

logger = logging.getLogger(__name__)


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


def cmd_tune(args: argparse.Namespace) -> int:
    """Run the sweep (or the k-fold runs) and print the results table and the best job file."""
    from roundhouse.cluster.ps import server_cpus
    from roundhouse.cluster.runtime import ray_runtime
    from roundhouse.cluster.sweep.tuner import SweepPlan, apply_sweep_env, run_sweep
    from roundhouse.config.loading import load_job
    from roundhouse.trainer.preflight import preflight
    from roundhouse.weights.run_folder import with_absolute_storage

    job = with_absolute_storage(load_job(args.job, args.overrides))
    params = parse_params(args, job)
    preflight(job)
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
    with ray_runtime(job.cluster, args.address, extra_cpus=server_cpus(job) + 1):
        results = run_sweep(plan, resume=args.resume is not None)
    rows = summarize(results, plan)
    check_some_trial_ran(results, rows)
    for line in format_table(rows, plan):
        print(line)
    best = write_outcome(rows, plan)
    print(f"best job: {best}" if best else "no trial reported the metric")
    return 0
