"""Checks a job must pass before anything starts: names that exist, topology that adds up."""

from __future__ import annotations

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology
from roundhouse.errors import JobFileError, ModelError
from roundhouse.parallel.registry import get_strategy_class
from roundhouse.trainer.losses import LOSSES
from roundhouse.trainer.multi_optim import check_task_job
from roundhouse.trainer.optim import check_optimizer, check_scheduler


def check_names(job: JobSpec) -> None:
    """Unknown model, flavor, optimizer, scheduler or loss: an error listing the valid ones."""
    spec = models.get(job.model.name)
    if job.model.flavor not in spec.flavors:
        raise ModelError(
            f"model {job.model.name!r} has no flavor {job.model.flavor!r}",
            f"valid flavors: {', '.join(spec.flavors)}",
        )
    check_optimizer(job.trainer.optimizer)
    check_scheduler(job.trainer.scheduler)
    if job.trainer.loss.name not in LOSSES:
        raise JobFileError(
            f"unknown loss trainer.loss.name={job.trainer.loss.name!r}",
            f"valid: {', '.join(LOSSES)}",
        )


def check_topology(job: JobSpec, world_size: int) -> Topology:
    """Validate the parallel layout for `world_size` workers and return it.

    Raises:
        JobFileError: The layout does not add up, or the strategy's own checks fail.
    """
    topology = Topology.of_job(job, world_size).check()
    get_strategy_class(job.strategy).check_job(job, world_size)
    return topology.check_batch()


def check_runnable(job: JobSpec, *, local: bool) -> Topology:
    """Everything that can be checked without data or a model; returns the topology.

    Raises:
        RoundhouseError: An unknown name, an unavailable strategy or a layout that fails.
    """
    check_names(job)
    strategy = get_strategy_class(job.strategy)
    world_size = 1 if local else job.cluster.num_workers
    strategy.check_world_size(world_size)
    topology = check_topology(job, world_size)
    check_finetune_job(job)
    check_task_job(job)  # the task loads; its optimizers fit the model and the strategy
    return topology


def check_finetune_job(job: JobSpec) -> None:
    """`init_from`, `freeze` and `param_groups` against the model on the meta device, so a bad
    source or glob fails before anything is written."""
    finetune = job.trainer
    if not (job.model.init_from or finetune.freeze or finetune.optimizer.param_groups):
        return
    import torch

    from roundhouse.data import build_splits
    from roundhouse.trainer.finetune import check_finetune
    from roundhouse.trainer.model_build import build_model_for

    info = build_splits(job.data, seed=job.trainer.seed).info
    with torch.device("meta"):
        model = build_model_for(job, info.input_shape, info.num_classes)
    check_finetune(job, model)
