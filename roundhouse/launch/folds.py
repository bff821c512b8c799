"""`roundhouse train JOB --folds K`: k-fold cross-validation for in-memory sources.

K runs, one per fold, each validating on fold k of the train+val samples (`data.fold`); the
test split is the same for all. Run folders: `<storage>/<name>/folds-<id>/fold-<k>/`. The
result is the mean and standard deviation over the folds of every final validation metric.
"""

from __future__ import annotations

import logging
import statistics

from roundhouse.config import JobSpec
from roundhouse.errors import DataError, JobFileError

logger = logging.getLogger(__name__)


def check_folds(job: JobSpec, folds: int) -> None:
    """K of at least 2, and data held in memory (a streamed dataset has fixed splits)."""
    if folds < 2:
        raise JobFileError(f"--folds {folds} must be at least 2", "e.g. --folds 5")
    if job.data.train is not None:
        raise DataError(
            "--folds needs an in-memory data.source; data.train streams a prepared dataset "
            "whose splits are fixed",
            "use data.source, or train without --folds",
        )


def fold_jobs(job: JobSpec, folds: int, group_id: str) -> list[JobSpec]:
    """One job per fold, its run folder `<name>/folds-<id>/fold-<k>`."""
    jobs = []
    for index in range(folds):
        fold = job.model_copy(deep=True)
        fold.data.fold = (index, folds)
        fold.storage.run_id = f"{group_id}/fold-{index}"
        fold.tracking.wandb.group = fold.tracking.wandb.group or group_id
        jobs.append(fold)
    return jobs


def summarize_folds(results: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and (sample) standard deviation of every `val/` metric over the folds."""
    names = sorted({k for r in results for k in r if k.startswith("val/")})
    summary = {}
    for name in names:
        values = [r[name] for r in results if name in r]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[name] = (statistics.fmean(values), spread)
    return summary


def train_folds(
    job: JobSpec, folds: int, *, local: bool, address: str | None = None
) -> dict[str, tuple[float, float]]:
    """Train the K fold runs one after another (in this process, or on one Ray runtime)."""
    from roundhouse.runs.rundir import new_run_id

    check_folds(job, folds)
    jobs = fold_jobs(job, folds, f"folds-{new_run_id()}")
    if local:
        from roundhouse.launch.local import train_local

        results = [train_local(j) for j in jobs]
    else:
        results = _train_on_ray(jobs, address)
    return summarize_folds(results)


def _train_on_ray(jobs: list[JobSpec], address: str | None) -> list[dict[str, float]]:
    from roundhouse.cluster.ps import server_cpus
    from roundhouse.cluster.runtime import ray_runtime
    from roundhouse.cluster.workers import train_on_ray
    from roundhouse.weights.run_folder import prepare_run

    results = []
    with ray_runtime(jobs[0].cluster, address, extra_cpus=server_cpus(jobs[0])):
        for job in jobs:
            prepared = prepare_run(job)
            logger.info("fold %s: run folder %s", job.data.fold, prepared.run_dir.url)
            results.append(train_on_ray(prepared, resume=False))
    return results
