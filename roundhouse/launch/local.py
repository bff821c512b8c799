"""`--local`: rank 0 of 1 in this process, no Ray. The debugging mode."""

from __future__ import annotations

import logging

from roundhouse.config import JobSpec
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run

logger = logging.getLogger(__name__)


def train_local(job: JobSpec, resume: str | None = None) -> dict[str, float]:
    """Train `job` in this process; `resume` is None, "latest" or a run/checkpoint path."""
    prepared = prepare_run(job, resume)
    logger.info("run folder: %s", prepared.run_dir.url)
    ctx = build_local_context(job.trainer.device)
    return run_worker(
        prepared.job, ctx, resume_step=prepared.resume_step, resume=resume is not None
    )
