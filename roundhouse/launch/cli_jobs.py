"""`roundhouse submit` and `roundhouse jobs list|status|logs|stop`: jobs on a Ray cluster.

roundhouse submit JOB.yaml [key.sub=value ...] --address http://HEAD:8265 [--wait]
    [--working-dir DIR] [--env NAME ...]
roundhouse jobs list --address URL
roundhouse jobs status ID | logs ID [--follow] | stop ID [--no-wait]

Exit codes: 2 for a user error (bad job file, unreachable address, unknown id); for a job's
outcome (`submit --wait`, `jobs status`, `jobs logs --follow`) 0 SUCCEEDED (and for
`jobs status` also PENDING/RUNNING), 1 FAILED, 3 STOPPED; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from roundhouse.cluster.jobs import JobsClient

STOP_WAIT_S = 60.0
EXIT_INTERRUPTED = 130


def _address_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: `jobs --address X list` and `jobs list --address X` both work (a None default
    # of the inner parser would overwrite the outer value).
    parent.add_argument(
        "--address",
        default=argparse.SUPPRESS,
        help="the cluster's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
        "then RAY_ADDRESS)",
    )
    return parent


def add_submit_parser(
    commands: argparse._SubParsersAction, common: argparse.ArgumentParser
) -> None:
    """Adds `submit` to the CLI."""
    submit = commands.add_parser(
        "submit", parents=[common, _address_parent()], help="run a job on a Ray cluster (Ray Jobs)"
    )
    submit.add_argument("job", help="job file (YAML), inside the working dir")
    submit.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="override job-file values"
    )
    submit.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stream the job's logs until it ends and exit with its outcome "
        "(0 SUCCEEDED, 1 FAILED, 3 STOPPED); default: print the id and return",
    )
    submit.add_argument(
        "--working-dir",
        default=".",
        help="project folder uploaded with the job; must contain the job file (default: .)",
    )
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME",
        help="forward this environment variable (e.g. a storage secret) to the job; "
        "WANDB_API_KEY and TORCH_EXTENSIONS_DIR are forwarded when set",
    )


def add_jobs_parser(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Adds `jobs list|status|logs|stop` to the CLI."""
    parents = [common, _address_parent()]
    jobs = commands.add_parser("jobs", parents=parents, help="list, follow and stop Ray jobs")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    sub.add_parser("list", parents=parents, help="all jobs of the cluster")
    status = sub.add_parser("status", parents=parents, help="a job's status (exit code: outcome)")
    status.add_argument("id", help="submission id (from `submit` or `jobs list`)")
    logs = sub.add_parser("logs", parents=parents, help="a job's logs")
    logs.add_argument("id")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="stream until the job ends; exit: outcome"
    )
    stop = sub.add_parser("stop", parents=parents, help="stop a job")
    stop.add_argument("id")
    stop.add_argument("--no-wait", action="store_true", help="do not wait until it has stopped")


# --- commands ----------------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    """Validates the job here, then submits it; with --wait, follows it to the end."""
    from roundhouse.config.loading import load_job
    from roundhouse.launch.auto import is_auto
    from roundhouse.launch.submission import build_submission, storage_warning
    from roundhouse.trainer.preflight import STRATEGY_CHECKS, preflight

    job = load_job(args.job, args.overrides)
    # `strategy.kind: auto` is planned where it runs, by its `train`: no layout to check here.
    preflight(job, skip=STRATEGY_CHECKS if is_auto(job) else ())
    submission = build_submission(
        job, Path(args.job), args.overrides, Path(args.working_dir), os.environ, args.env
    )
    warning = storage_warning(job)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    from roundhouse.cluster.jobs import JobsClient

    client = JobsClient(getattr(args, "address", None))
    job_id = client.submit(submission.entrypoint, submission.runtime_env, submission.metadata)
    print(job_id, flush=True)
    print(
        f"submitted {job.name!r} to {client.address}; follow it with "
        f"`roundhouse jobs logs {job_id} --follow --address {client.address}`",
        file=sys.stderr,
    )
    return _follow(client, job_id) if args.wait else 0


def _quiet_ray_sdk() -> None:
    """Ray's job SDK logs every closed log stream at INFO; the CLI prints the outcome itself."""
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _follow(client: JobsClient, job_id: str) -> int:
    from roundhouse.cluster.jobs import exit_code

    _quiet_ray_sdk()
    try:
        info = client.follow(job_id, _write)
    except KeyboardInterrupt:
        print(
            f"error: interrupted; job {job_id} keeps running on the cluster "
            f"(stop it with `roundhouse jobs stop {job_id} --address {client.address}`)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    # The first line only: Ray appends the last logs to a failed job's message.
    message = f": {info.message.splitlines()[0]}" if info.message else ""
    print(f"job {job_id} {info.status}{message}", file=sys.stderr)
    return exit_code(info.status)


def _list(client: JobsClient) -> int:
    from roundhouse.cluster.jobs import format_time

    jobs = client.list_jobs()
    if not jobs:
        print(f"no jobs on the cluster at {client.address}")
        return 0
    width = max(len("ID"), *(len(j.job_id) for j in jobs))
    print(f"{'ID':<{width}}  {'STATUS':<9}  {'STARTED':<19}  ENTRYPOINT")
    for j in jobs:
        started = format_time(j.start_time)
        print(f"{j.job_id:<{width}}  {j.status:<9}  {started:<19}  {j.entrypoint}")
    return 0


def _status(client: JobsClient, job_id: str) -> int:
    from roundhouse.cluster.jobs import exit_code, format_time

    info = client.info(job_id)
    rows = [
        ("id", info.job_id),
        ("status", info.status),
        ("message", info.message.splitlines()[0] if info.message else "-"),
        ("started", format_time(info.start_time)),
        ("ended", format_time(info.end_time)),
        ("entrypoint", info.entrypoint),
    ]
    for key, value in rows:
        print(f"{key:<11}{value}")
    return exit_code(info.status)


def _logs(client: JobsClient, args: argparse.Namespace) -> int:
    if args.follow:
        return _follow(client, args.id)
    _write(client.logs(args.id))
    return 0


def _stop(client: JobsClient, args: argparse.Namespace) -> int:
    was_running = client.stop(args.id)
    if not was_running:
        print(f"job {args.id} was not running ({client.info(args.id).status})")
        return 0
    if args.no_wait:
        print(f"job {args.id}: stop requested")
        return 0
    info = client.wait(args.id, timeout_s=STOP_WAIT_S)
    print(f"job {args.id} {info.status}")
    return 0 if info.is_terminal else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    """Runs `roundhouse jobs list|status|logs|stop`; returns the exit code."""
    from roundhouse.cluster.jobs import JobsClient

    client = JobsClient(getattr(args, "address", None))
    if args.jobs_command == "list":
        return _list(client)
    if args.jobs_command == "status":
        return _status(client, args.id)
    if args.jobs_command == "logs":
        return _logs(client, args)
    return _stop(client, args)
