"""The run folder a job writes to: `prepare_run` binds a job to it once per job (not per worker).

It picks the folder (new, or the one `--resume` names), finds the checkpoint to resume from,
checks the folder is writable, and writes the resolved, secret-free `job.yaml`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from roundhouse.config import JobSpec
from roundhouse.errors import CheckpointError
from roundhouse.runs.rundir import RunDir, job_folder, new_run_id, run_dir_of
from roundhouse.runs.tracking import redact_secrets
from roundhouse.weights.checkpoint import CHECKPOINTS, LATEST, MANIFEST, Checkpointer


@dataclass
class PreparedRun:
    """A job bound to its run folder. `job.storage.run_id` is always set."""

    job: JobSpec
    run_dir: RunDir
    resume_step: int | None = None


def prepare_run(job: JobSpec, resume: str | None = None) -> PreparedRun:
    """Choose the run folder (new, or the one to resume), check it is writable, write job.yaml.

    Args:
        job: the validated job.
        resume: None for a new run; "latest" for the newest checkpointed run of this job; or
            a path/URL of a run folder or of one `checkpoints/step_<N>` folder.
    """
    job = with_absolute_storage(job)
    if resume is None:
        run_id = job.storage.run_id or new_run_id()
        prepared = PreparedRun(job.model_copy(deep=True), RunDir(""), None)
        prepared.job.storage.run_id = run_id
    else:
        prepared = find_resume_point(job, resume)
    prepared.run_dir = run_dir_of(prepared.job)
    prepared.run_dir.ensure_writable()
    write_job_yaml(prepared.run_dir, prepared.job)
    return prepared


def with_absolute_storage(job: JobSpec) -> JobSpec:
    """A relative local storage path made absolute, so workers with another cwd agree."""
    if "://" in job.storage.path or os.path.isabs(job.storage.path):
        return job
    bound = job.model_copy(deep=True)
    bound.storage.path = os.path.abspath(job.storage.path)
    return bound


def find_resume_point(job: JobSpec, resume: str) -> PreparedRun:
    """Locate the run folder and checkpoint step that `--resume` names."""
    if resume == "latest":
        parent = job_folder(job)
        runs = [r for r in reversed(parent.listdir()) if parent.exists(r, CHECKPOINTS, LATEST)]
        if not runs:
            raise CheckpointError(
                f"no checkpoint to resume under {parent.url}",
                "train without --resume first, or pass --resume PATH",
            )
        return _bind(job, f"{parent.url}/{runs[0]}", step=None)
    target = RunDir(resume)
    if target.exists(MANIFEST):  # a checkpoints/step_<N> folder
        step = int(target.url.rsplit("/", 1)[-1].removeprefix("step_"))
        return _bind(job, target.url.rsplit("/", 2)[0], step=step)
    if target.exists(CHECKPOINTS, LATEST):
        return _bind(job, target.url, step=None)
    raise CheckpointError(
        f"no checkpoint at {resume!r}",
        "pass a run folder that has checkpoints/latest, a checkpoints/step_<N> folder, or latest",
    )


def _bind(job: JobSpec, run_url: str, step: int | None) -> PreparedRun:
    """Resume into the run folder `<storage>/<name>/<run id>` that `run_url` names."""
    parent_url, _, run_id = run_url.rstrip("/").rpartition("/")
    storage, _, name = parent_url.rpartition("/")
    bound = job.model_copy(deep=True)
    bound.storage.path, bound.name, bound.storage.run_id = storage or ".", name, run_id
    run_dir = run_dir_of(bound)
    if step is None:
        step = Checkpointer(run_dir, keep_last=1, identity={}).latest_step()
    return PreparedRun(bound, run_dir, step)


def write_job_yaml(run_dir: RunDir, job: JobSpec) -> None:
    """The resolved job, secrets redacted, as the run folder's `job.yaml`."""
    data = redact_secrets(job.model_dump(mode="json"))
    run_dir.write_text("job.yaml", yaml.safe_dump(data, sort_keys=False))
