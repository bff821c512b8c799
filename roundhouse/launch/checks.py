"""Checks a job must pass before anything starts: names that exist, topology that adds up."""

from __future__ import annotations

from dataclasses import dataclass

from roundhouse import models
from roundhouse.errors import JobFileError, ModelError
from roundhouse.spec import JobSpec
from roundhouse.trainer.losses import LOSSES
from roundhouse.trainer.optim import check_optimizer, check_scheduler
from roundhouse.trainer.strategies import STRATEGIES


@dataclass(frozen=True)
class Topology:
    """How a job's workers divide the work."""

    world_size: int
    data_parallel: int
    model_parallel: int
    grad_accum_steps: int
    global_batch: int

    @property
    def micro_batch(self) -> float:
        return self.global_batch / (self.data_parallel * self.grad_accum_steps)


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
    """Validate the parallel layout for `world_size` workers and return it."""
    strategy = job.strategy
    model_parallel = getattr(strategy, "model_parallel_size", 1)
    if world_size % model_parallel:
        raise JobFileError(
            f"pipeline_stages x tensor_parallel = {model_parallel} does not divide the "
            f"world size {world_size}",
            "make cluster.num_workers a multiple of pipeline_stages * tensor_parallel",
        )
    if job.strategy.kind == "deepspeed":
        from roundhouse.trainer.strategies.deepspeed_config import check_job

        check_job(job, world_size)  # raw-vs-typed ds_config, expert and pipeline arithmetic
    data_parallel = world_size // model_parallel
    accum = job.trainer.grad_accum_steps
    if job.data.batch_size < data_parallel * accum:
        raise JobFileError(
            f"data.batch_size={job.data.batch_size} is smaller than data-parallel ranks x "
            f"accumulation steps = {data_parallel} x {accum} = {data_parallel * accum}",
            "raise data.batch_size or lower trainer.grad_accum_steps",
        )
    return Topology(world_size, data_parallel, model_parallel, accum, job.data.batch_size)


def check_runnable(job: JobSpec, *, local: bool) -> Topology:
    """Everything that can be checked without data or a model; returns the topology."""
    check_names(job)
    if job.strategy.kind not in STRATEGIES:
        raise JobFileError(
            f"strategy.kind={job.strategy.kind!r} is not available in this version of roundhouse",
            f"available: {', '.join(STRATEGIES)}",
        )
    world_size = 1 if local else job.cluster.num_workers
    if job.strategy.kind == "single" and world_size != 1:
        raise JobFileError(
            f"strategy.kind=single runs on one worker, but cluster.num_workers={world_size}",
            "pass --local, set cluster.num_workers=1, or pick a distributed strategy",
        )
    topology = check_topology(job, world_size)
    check_finetune_job(job)
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
    from roundhouse.trainer.run import build_model_for

    info = build_splits(job.data, seed=job.trainer.seed).info
    with torch.device("meta"):
        model = build_model_for(job, info.input_shape, info.num_classes)
    check_finetune(job, model)
