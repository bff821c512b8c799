"""What `roundhouse submit` sends to a Ray cluster: the entrypoint, runtime_env and metadata.

Pure functions (no Ray, no network), so the rules are unit-tested:

- the entrypoint is `roundhouse train <job file, relative to working_dir> --address auto
  <overrides>`, shell-quoted;
- `runtime_env.working_dir` is the user's project (it must contain the job file), uploaded
  without virtualenvs, git data, run folders and caches; the job's `cluster.runtime_env`
  (pip, env_vars, ...) is merged in;
- secrets travel only as environment variables taken from the submitter's environment
  (`WANDB_API_KEY`, plus any `--env NAME`); a job file that holds a secret is rejected.
"""

from __future__ import annotations

import copy
import importlib.metadata
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from roundhouse.config import JobSpec
from roundhouse.errors import JobFileError
from roundhouse.runs.tracking import is_secret_key

# Never uploaded with the working dir (Ray also skips what .gitignore lists).
DEFAULT_EXCLUDES = (
    ".git/",
    ".venv/",
    "venv/",
    "runs/",
    ".cache/",
    "__pycache__/",
    "*.pyc",
    "wandb/",
    ".ray_results/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "*.egg-info/",
)
# Forwarded from the submitter's environment when set: the W&B key (a secret) and the DeepSpeed
# extension cache.
FORWARDED_ENV_VARS = ("WANDB_API_KEY", "TORCH_EXTENSIONS_DIR")


@dataclass(frozen=True)
class Submission:
    """Everything `JobSubmissionClient.submit_job` needs for one roundhouse job."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def job_path_in(working_dir: Path, job_file: Path) -> PurePosixPath:
    """The job file's path relative to `working_dir`; an error if it lies outside."""
    root, path = working_dir.resolve(), job_file.resolve()
    try:
        relative = PurePosixPath(path.relative_to(root).as_posix())
    except ValueError:
        raise JobFileError(
            f"job file {str(job_file)!r} is not inside the working dir {str(root)!r}, which is "
            "what gets uploaded to the cluster",
            "pass --working-dir with your project folder (one that contains the job file)",
        ) from None
    top = relative.parts[0] + "/"
    if top in DEFAULT_EXCLUDES:
        raise JobFileError(
            f"job file {str(job_file)!r} is inside {top!r}, which is never uploaded",
            "move the job file elsewhere in your project",
        )
    return relative


def build_entrypoint(job_path: PurePosixPath, overrides: Sequence[str]) -> str:
    """The shell command the cluster runs: `roundhouse train JOB --address auto OVERRIDES`."""
    words = ["roundhouse", "train", str(job_path), "--address", "auto", *overrides]
    return shlex.join(words)


def build_env_vars(
    job: JobSpec, environ: Mapping[str, str], forward: Sequence[str] = ()
) -> dict[str, str]:
    """`env_vars` for the job: forwarded variables, then the job's own (which win)."""
    names = [*FORWARDED_ENV_VARS, *forward]
    env_vars = {name: environ[name] for name in names if environ.get(name)}
    missing = [name for name in forward if not environ.get(name)]
    if missing:
        raise JobFileError(
            f"--env {missing[0]}: the variable is not set in this environment",
            "export it before submitting, or drop --env",
        )
    for name, value in job_env_vars(job).items():
        env_vars[name] = value
    return env_vars


def job_env_vars(job: JobSpec) -> dict[str, str]:
    """`cluster.runtime_env.env_vars` as strings; a secret among them is an error."""
    raw = job.cluster.runtime_env.get("env_vars") or {}
    if not isinstance(raw, dict):
        raise JobFileError(
            "cluster.runtime_env.env_vars must be a mapping of NAME: value",
            "e.g. env_vars: {NCCL_DEBUG: INFO}",
        )
    for name in raw:
        if is_secret_key(str(name)):
            raise JobFileError(
                f"cluster.runtime_env.env_vars.{name} looks like a secret, and job files must "
                "not hold secrets",
                f"remove it and export {name} before submitting with --env {name} "
                "(WANDB_API_KEY is forwarded without --env)",
            )
    return {str(k): v if isinstance(v, str) else _scalar_text(k, v) for k, v in raw.items()}


def _scalar_text(name: Any, value: Any) -> str:
    if isinstance(value, (dict, list)) or value is None:
        raise JobFileError(
            f"cluster.runtime_env.env_vars.{name} must be a string or number, got {value!r}",
            "quote the value",
        )
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def build_runtime_env(
    job: JobSpec, working_dir: Path, environ: Mapping[str, str], forward: Sequence[str] = ()
) -> dict[str, Any]:
    """The job's `cluster.runtime_env` plus the working dir, excludes and env_vars."""
    runtime_env = copy.deepcopy(job.cluster.runtime_env)
    if "working_dir" in runtime_env:
        raise JobFileError(
            "cluster.runtime_env.working_dir is set by `roundhouse submit`",
            "remove it from the job file; pass --working-dir (default: the current directory)",
        )
    runtime_env["working_dir"] = str(working_dir.resolve())
    runtime_env["excludes"] = [*DEFAULT_EXCLUDES, *runtime_env.get("excludes", [])]
    env_vars = build_env_vars(job, environ, forward)
    if env_vars:
        runtime_env["env_vars"] = env_vars
    return runtime_env


def build_submission(
    job: JobSpec,
    job_file: Path,
    overrides: Sequence[str],
    working_dir: Path,
    environ: Mapping[str, str],
    forward: Sequence[str] = (),
) -> Submission:
    """Entrypoint, runtime_env and metadata for submitting `job_file` from `working_dir`."""
    if not working_dir.is_dir():
        raise JobFileError(f"--working-dir {str(working_dir)!r} is not a folder", "check the path")
    job_path = job_path_in(working_dir, job_file)
    metadata = {
        "roundhouse_job": job.name,
        "roundhouse_version": roundhouse_version(),
        "job_file": str(job_path),
    }
    return Submission(
        entrypoint=build_entrypoint(job_path, overrides),
        runtime_env=build_runtime_env(job, working_dir, environ, forward),
        metadata=metadata,
    )


def roundhouse_version() -> str:
    """The installed roundhouse version ("unknown" when running from an uninstalled tree)."""
    try:
        return importlib.metadata.version("roundhouse")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def storage_warning(job: JobSpec) -> str | None:
    """A warning when runs would land inside the job's temporary working dir on the cluster."""
    path = job.storage.path
    if "://" in path or Path(path).is_absolute():
        return None
    return (
        f"storage.path={path!r} is relative: on the cluster it resolves inside the job's "
        "temporary working dir; use shared storage (s3://..., gs://...) or an absolute path "
        "every node can write"
    )
