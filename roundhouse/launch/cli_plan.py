"""`roundhouse plan JOB.yaml`: predicted memory and step time of every strategy, and a pick.

    roundhouse plan JOB.yaml [key.sub=value ...] [--workers 1,2,4,8] [--device cpu|cuda|H100-80GB]
                    [--bandwidth 25GB/s] [--strategies ring,deepspeed] [--all] [--json]
                    [--recalibrate]

Exit 0 with a recommendation, 2 when no row fits (the table is still printed, then one line
saying what would fit). With `--json` the JSON is the only thing on stdout: whatever the
calibration writes there (DeepSpeed's JIT op builds, ninja, a spawned rank) goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator

from roundhouse.errors import JobFileError

EXIT_NO_FIT = 2
TABLE_ROWS = 25


def add_plan_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `plan` command to the CLI's subcommands."""
    plan = commands.add_parser(
        "plan", parents=[common], help="predict memory and step time of every strategy"
    )
    plan.add_argument("job", help="job file (YAML)")
    plan.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override values")
    plan.add_argument(
        "--workers", help="worker counts, e.g. 1,2,4,8 (default: 1,2,4.. up to cluster.num_workers)"
    )
    plan.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (this machine, calibrated) or a known accelerator "
        "(H100-80GB, H200, A100-80GB, A100-40GB, L4, A10G, V100)",
    )
    plan.add_argument(
        "--bandwidth",
        help="link bandwidth per worker, e.g. 25GB/s (default: "
        "measured here, or the accelerator's network)",
    )
    plan.add_argument("--strategies", help="only these strategy kinds, e.g. ring,deepspeed")
    plan.add_argument("--all", action="store_true", help="show every row, not the best 25")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--recalibrate",
        action="store_true",
        help="measure this machine again instead of reading the cached rates "
        "(after a busy run or a hardware change)",
    )


def parse_workers(text: str) -> list[int]:
    """`1,2,4` or `1-64` (powers of two in the range) -> sorted worker counts."""
    try:
        if "-" in text:
            low, high = (int(v) for v in text.split("-"))
            counts = [2**k for k in range(64) if low <= 2**k <= high] + [low, high]
        else:
            counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise JobFileError(
            f"--workers {text!r} is not a list of worker counts", "write it like 1,2,4,8 or 1-64"
        )
    return sorted(set(counts))


def cmd_plan(args: argparse.Namespace) -> int:
    """Plan the job at every worker count and print the table (or JSON) and the recommendation."""
    from roundhouse.config.loading import load_job
    from roundhouse.planner import build_plan, default_workers
    from roundhouse.planner.calibrate import remeasured
    from roundhouse.planner.devices import get_accelerator, parse_bandwidth
    from roundhouse.planner.report import format_plan, plan_json
    from roundhouse.trainer.preflight import STRATEGY_CHECKS, preflight

    get_accelerator(args.device)  # an unknown device fails before anything is built
    bandwidth = parse_bandwidth(args.bandwidth) if args.bandwidth else None
    job = load_job(args.job, args.overrides)
    workers = parse_workers(args.workers) if args.workers else default_workers(job)
    kinds = tuple(k.strip() for k in args.strategies.split(",")) if args.strategies else None
    with stdout_to_stderr() if args.json else contextlib.nullcontext():
        preflight(job, max(workers), skip=STRATEGY_CHECKS)  # each row checks its own strategy
        with remeasured() if args.recalibrate else contextlib.nullcontext():
            plan = build_plan(job, workers, args.device, bandwidth, kinds)
    if args.json:
        print(json.dumps(plan_json(plan), indent=1))
    else:
        for line in format_plan(plan, None if args.all else TABLE_ROWS):
            print(line)
    if not plan.fits:
        print(f"error: {plan.reason}", file=sys.stderr)
        return EXIT_NO_FIT
    return 0


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout inside the block to stderr: Python's `print`, C code
    writing to file descriptor 1, and child processes (they inherit the descriptor). DeepSpeed
    builds and loads its ops (ninja, "op built successfully") that way during calibration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)
