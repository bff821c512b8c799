"""`roundhouse train JOB` without `--local`: the job on Ray workers (embedded or connected)."""

from __future__ import annotations

import logging
from typing import Any

from roundhouse.config import JobSpec
from roundhouse.weights.run_folder import prepare_run

logger = logging.getLogger(__name__)


def train_with_ray(
    job: JobSpec,
    resume: str | None = None,
    address: str | None = None,
    strategy_by_size: dict[int, dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Prepare the run folder here, then train on `cluster.num_workers` Ray workers.

    `strategy_by_size`: for `strategy.kind: auto` on an elastic group, the strategy each world
    size runs (see `roundhouse.launch.auto`).
    """
    from roundhouse.cluster.ps import server_cpus
    from roundhouse.cluster.runtime import ray_runtime
    from roundhouse.cluster.workers import train_on_ray

    prepared = prepare_run(job, resume)
    logger.info("run folder: %s", prepared.run_dir.url)
    with ray_runtime(job.cluster, address, extra_cpus=server_cpus(job)):
        return train_on_ray(
            prepared, resume=resume is not None, strategy_by_size=strategy_by_size or {}
        )
