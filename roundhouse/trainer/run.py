"""`run_worker`: build everything for one worker from the job and train.

The launcher binds the job to its run folder first, once per job (`weights.run_folder`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology, compute_total_steps
from roundhouse.parallel.base import TrainPlan
from roundhouse.parallel.compile import apply_compile
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.sync_norm import apply_sync_batch_norm
from roundhouse.runs.rundir import run_dir_of
from roundhouse.runs.status import RunStatus
from roundhouse.runs.tracking import Tracker
from roundhouse.trainer.async_checkpoint import SyncSaver
from roundhouse.trainer.distill import build_distill_task
from roundhouse.trainer.live_recovery import LiveRecovery
from roundhouse.trainer.loop import Trainer, build_train_loader
from roundhouse.trainer.multi_optim import build_task_strategy
from roundhouse.trainer.optim import (
    build_optimizer,
    build_optimizer_factory,
    build_scheduler,
    group_counts,
)
from roundhouse.trainer.preemption import Preempted
from roundhouse.trainer.sample_ledger import build_step_ledger
from roundhouse.trainer.task import Task, build_job_task
from roundhouse.weights.checkpoint import Checkpointer
from roundhouse.weights.finetune import apply_finetune
from roundhouse.weights.lora import AdapterCheckpoint, apply_lora
from roundhouse.weights.model_build import build_model_with_data, seed_everything

logger = logging.getLogger(__name__)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless asked."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_plan(
    job: JobSpec, task: Task, device: torch.device, *, steps_per_epoch: int, total_steps: int
) -> TrainPlan:
    """Optimizer/scheduler factories and step options for the strategy."""
    cfg = job.trainer
    return TrainPlan(
        task=task,
        build_optimizer=functools.partial(build_optimizer, config=cfg.optimizer),
        build_scheduler=functools.partial(
            build_scheduler,
            config=cfg.scheduler,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
        ),
        grad_clip_norm=cfg.grad_clip_norm,
        autocast_dtype=autocast_dtype(cfg.precision, device),
        pipeline_layers=models.get(job.model.name).pipeline_layers,
    )


def run_worker(
    job: JobSpec,
    ctx: WorkerContext,
    resume_step: int | None = None,
    resume: bool = False,
    prebuilt: tuple[torch.nn.Module, Any] | None = None,
) -> dict[str, float]:
    """Train `job` as worker `ctx`; return the final metrics (the same on every rank).

    `job.storage.run_id` must be set (see `prepare_run`). With `resume`, the checkpoint
    `resume_step` (None: latest) of that run is restored first. `prebuilt`: the model and data
    splits `build_model_with_data(job)` returned, built before this worker had its group (a
    live replacement builds them before it asks to be admitted, so the members do not wait
    for its data; its weights come from them).
    """
    seed_everything(job.trainer.seed, job.trainer.deterministic, ctx.device)
    run_dir = run_dir_of(job)
    identity = {"model": job.model.name, "flavor": job.model.flavor}
    checkpointer = Checkpointer(
        run_dir, keep_last=job.trainer.checkpoint.keep_last, identity=identity
    )
    if resume and resume_step is None:
        resume_step = checkpointer.latest_step()
    trainer = build_trainer(job, ctx, checkpointer, resume_step if resume else None, prebuilt)
    status = RunStatus(run_dir, enabled=ctx.is_main, world_size=ctx.world_size)
    try:
        if resume:
            trainer.restore(resume_step)
        if trainer.recovery is not None and ctx.rendezvous.joined_late:
            trainer.recovery.join_fresh(trainer)  # a replacement: the members' state
        metrics = trainer.fit()
        trainer.saver.close()  # the run ends once its last checkpoint is committed
    except BaseException as exc:
        close_quietly(trainer.saver)  # an earlier save in flight still commits
        preempted = isinstance(exc, Preempted)
        trainer.tracker.close(failed=True, preempted=preempted)
        status.enabled = trainer.ctx.is_main  # live recovery may have made this rank 0
        status.end(exc, preempted=preempted)
        raise
    finally:
        trainer.strategy.close()
        if trainer.ledger is not None:
            trainer.ledger.close()
    trainer.tracker.close()
    status.enabled = trainer.ctx.is_main
    status.end()
    return metrics


def close_quietly(saver: SyncSaver) -> None:
    """Wait for a checkpoint in flight while another error is on its way up; log its failure."""
    try:
        saver.close()
    except Exception:
        logger.exception("the checkpoint in flight failed too")


def build_trainer(
    job: JobSpec,
    ctx: WorkerContext,
    checkpointer: Checkpointer,
    resume_step: int | None,
    prebuilt: tuple[torch.nn.Module, Any] | None = None,
) -> Trainer:
    """Data, model, task, strategy, loader and tracker for this worker, wired into a `Trainer`
    (the model and data: `prebuilt`, where `run_worker` was given them).

    The job's layout (`Topology`) is built here, once per worker, into `ctx` (where `ctx` does
    not carry one yet): the strategy and the data sampler read it from there.
    """
    if ctx.topology is None:
        ctx = ctx.with_topology(Topology.of_job(job, ctx.world_size))
    # the data fits the task, the model the data
    model, splits = prebuilt if prebuilt is not None else build_model_with_data(job)
    apply_finetune(model, job)  # init_from weights, frozen parameters
    lora = apply_lora(model, job)  # freezes the base: only adapters train (None without lora)
    apply_sync_batch_norm(model, job.model.options.get("norm"), ctx)  # global batch statistics
    logger.info("model %s: %s", job.model.name, group_counts(model, job.trainer.optimizer)[0])
    task = build_distill_task(job, build_job_task(job, splits.info), splits, ctx.device)
    sizes: dict[str, int] = {}

    def plan_of(part_job: JobSpec, part_task: Task) -> TrainPlan:
        plan = build_plan(
            part_job,
            part_task,
            ctx.device,
            steps_per_epoch=sizes["steps"],
            total_steps=sizes["total"],
        )
        plan.build_optimizer = build_optimizer_factory(part_job, model)  # with param_groups
        return plan

    strategy = build_task_strategy(job, ctx, task, model, plan_of)
    loader = build_train_loader(job, splits, strategy)
    total = compute_total_steps(job, len(loader))
    sizes.update(steps=len(loader), total=total)
    strategy.setup(model, plan_of(job, task))
    apply_compile(strategy, job.trainer.compile, job.trainer.compile_mode)
    tracker = Tracker(
        job,
        checkpointer.run_dir,
        is_main=ctx.is_main,
        resumed=resume_step is not None,
        resume_step=resume_step,
        total_steps=total,
        extra_config={"model/num_params": sum(p.numel() for p in model.parameters())},
    )
    return Trainer(
        job,
        ctx,
        strategy=strategy,
        task=task,
        splits=splits,
        tracker=tracker,
        checkpointer=checkpointer,
        train_loader=loader,
        adapters=AdapterCheckpoint(lora) if lora is not None else None,
        ledger=build_step_ledger(job, checkpointer.run_dir, ctx.rank, loader),
        recovery=build_live_recovery(job, ctx, splits),
    )


def build_live_recovery(job: JobSpec, ctx: WorkerContext, splits: Any) -> LiveRecovery | None:
    """Live recovery when the job asks for it and the launcher gave a re-formable group."""
    if job.cluster.recovery != "live" or ctx.rendezvous is None:
        return None
    return LiveRecovery(ctx.rendezvous, functools.partial(build_train_loader, job, splits))
