"""`run_worker`: build everything for one worker from the job and train.

Also `prepare_run`, which the launcher calls once per job (not per worker) to pick the run
folder, find the checkpoint to resume from, and write the resolved `job.yaml`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import yaml

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.config.topology import compute_total_steps
from roundhouse.data import build_splits
from roundhouse.errors import CheckpointError
from roundhouse.parallel.base import TrainPlan
from roundhouse.parallel.compile import apply_compile
from roundhouse.parallel.context import WorkerContext
from roundhouse.runs.rundir import RunDir, job_folder, new_run_id, run_dir_of
from roundhouse.runs.status import RunStatus
from roundhouse.runs.tracking import Tracker, redact_secrets
from roundhouse.trainer.checkpoint import CHECKPOINTS, LATEST, MANIFEST, Checkpointer
from roundhouse.trainer.distill import build_distill_task
from roundhouse.trainer.finetune import apply_finetune, build_optimizer_factory
from roundhouse.trainer.loop import Trainer, build_train_loader
from roundhouse.trainer.lora import AdapterCheckpoint, apply_lora
from roundhouse.trainer.model_build import build_model_for, seed_everything
from roundhouse.trainer.multi_optim import build_task_strategy
from roundhouse.trainer.optim import build_optimizer, build_scheduler
from roundhouse.trainer.task import Task, build_job_task

logger = logging.getLogger(__name__)


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
        global_batch_size=job.data.batch_size,
        grad_accum_steps=cfg.grad_accum_steps,
        pipeline_layers=models.get(job.model.name).pipeline_layers,
    )


def run_worker(
    job: JobSpec, ctx: WorkerContext, resume_step: int | None = None, resume: bool = False
) -> dict[str, float]:
    """Train `job` as worker `ctx`; return the final metrics (the same on every rank).

    `job.storage.run_id` must be set (see `prepare_run`). With `resume`, the checkpoint
    `resume_step` (None: latest) of that run is restored first.
    """
    seed_everything(job.trainer.seed, job.trainer.deterministic, ctx.device)
    run_dir = run_dir_of(job)
    identity = {"model": job.model.name, "flavor": job.model.flavor}
    checkpointer = Checkpointer(
        run_dir, keep_last=job.trainer.checkpoint.keep_last, identity=identity
    )
    if resume and resume_step is None:
        resume_step = checkpointer.latest_step()
    trainer = build_trainer(job, ctx, checkpointer, resume_step if resume else None)
    status = RunStatus(run_dir, enabled=ctx.is_main, world_size=ctx.world_size)
    try:
        if resume:
            trainer.restore(resume_step)
        metrics = trainer.fit()
    except BaseException as exc:
        trainer.tracker.close(failed=True)
        status.end(exc)
        raise
    finally:
        trainer.strategy.close()
    trainer.tracker.close()
    status.end()
    return metrics


def build_trainer(
    job: JobSpec, ctx: WorkerContext, checkpointer: Checkpointer, resume_step: int | None
) -> Trainer:
    """Data, model, task, strategy, loader and tracker for this worker, wired into a `Trainer`."""
    splits = build_splits(job.data, seed=job.trainer.seed)
    task_kind = models.get(job.model.name).loss
    splits.check_task(task_kind, job.model.name)  # e.g. an image dataset for a language model
    model = build_model_for(job, splits.info.input_shape, splits.info.num_classes)
    apply_finetune(model, job)  # init_from weights, frozen parameters
    lora = apply_lora(model, job)  # freezes the base: only adapters train (None without lora)
    task = build_distill_task(job, build_job_task(job), splits, ctx.device)
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
    )
