"""The checks of the one pre-flight (`trainer/preflight.py`), in the order they run.

Each check takes the `JobUnderCheck` and returns its report lines, or raises the one-line
`RoundhouseError` a bad job would otherwise hit after something has started. The data info and
the meta-device model are materialised once, the first time a check asks for them, so the
cheap checks (names, layout, strategy) fail before any data is read.

LoRA targets must match a Linear or Conv layer of the model (built on the meta device: no
memory), and a distillation teacher must be a readable run or Hugging Face folder whose task,
input and output space are the student's. The layouts adapters cannot run under are refused by
each strategy's own `check_job`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology, compute_total_steps
from roundhouse.data import DataInfo, Splits, build_splits
from roundhouse.errors import JobFileError, ModelError
from roundhouse.models.sparse import SPARSE_OPTIMIZERS, wants_sparse_gradients
from roundhouse.parallel.registry import get_strategy_class
from roundhouse.trainer.distill import check_teacher, student_outputs
from roundhouse.trainer.live_recovery import check_live_recovery
from roundhouse.trainer.losses import LOSSES
from roundhouse.trainer.multi_optim import check_task_optimizers, resolve_optimizers
from roundhouse.trainer.optim import (
    check_optimizer,
    check_param_groups,
    check_scheduler,
    group_counts,
    trainable_names,
)
from roundhouse.trainer.sample_ledger import check_ledger_job
from roundhouse.trainer.task import build_job_task, task_name
from roundhouse.trainer.tasks_regression import resolve_job_task
from roundhouse.weights.finetune import apply_finetune
from roundhouse.weights.hf_teacher import check_hf_teacher, is_hf_teacher, read_hf_teacher
from roundhouse.weights.lora import apply_lora, check_targets
from roundhouse.weights.model_build import build_model_for
from roundhouse.weights.pretrained import LoadReport

logger = logging.getLogger(__name__)


@dataclass
class JobUnderCheck:
    """A job and what its checks look at, each built at most once.

    Args:
        job: the validated job.
        world_size: the number of workers it is checked for.
    """

    job: JobSpec
    world_size: int
    topology: Topology | None = None

    @functools.cached_property
    def splits(self) -> Splits:
        """The job's data (in-memory sources are read; streamed ones only their index)."""
        return build_splits(self.job.data, seed=self.job.trainer.seed)

    @property
    def info(self) -> DataInfo:
        """Shapes, classes and sample counts of the job's data."""
        return self.splits.info

    @functools.cached_property
    def model(self) -> torch.nn.Module:
        """The job's model on the meta device (no memory, no compute)."""
        with torch.device("meta"):
            return build_model_for(
                self.job, self.info.input_shape, self.info.num_classes, self.info.vocab_size
            )


Check = Callable[[JobUnderCheck], list[str]]


def check_names(subject: JobUnderCheck) -> list[str]:
    """Unknown model, flavor, optimizer, scheduler or loss: an error listing the valid ones."""
    job = subject.job
    spec = models.get(job.model.name)
    if job.model.flavor not in spec.flavors:
        raise ModelError(
            f"model {job.model.name!r} has no flavor {job.model.flavor!r}",
            f"valid flavors: {', '.join(spec.flavors)}",
        )
    check_optimizer(job.trainer.optimizer)
    check_sparse_optimizer(job)
    check_scheduler(job.trainer.scheduler)
    if job.trainer.loss.name not in LOSSES:
        raise JobFileError(
            f"unknown loss trainer.loss.name={job.trainer.loss.name!r}",
            f"valid: {', '.join(LOSSES)}",
        )
    return [f"job {job.name!r} is valid"]


def check_sparse_optimizer(job: JobSpec) -> None:
    """A model with sparse gradients needs an optimizer that steps on them, without weight
    decay (torch's sgd and adagrad refuse sparse gradients with it)."""
    model = job.model
    if not wants_sparse_gradients(model.name, model.flavor, model.options):
        return
    optimizer = job.trainer.optimizer
    if optimizer.name not in SPARSE_OPTIMIZERS or optimizer.weight_decay > 0:
        raise JobFileError(
            f"model {model.name!r} makes sparse gradients (model.options.sparse=true), which "
            f"trainer.optimizer name={optimizer.name} weight_decay={optimizer.weight_decay} "
            "cannot step on",
            f"use trainer.optimizer.name {' or '.join(SPARSE_OPTIMIZERS)} with weight_decay=0, "
            "or set model.options.sparse=false",
        )


def check_world(subject: JobUnderCheck) -> list[str]:
    """The strategy is available and runs on this many workers."""
    get_strategy_class(subject.job.strategy).check_world_size(subject.world_size)
    return []


def check_layout(subject: JobUnderCheck) -> list[str]:
    """The parallel degrees multiply to the world size."""
    subject.topology = Topology.of_job(subject.job, subject.world_size).check()
    return []


def check_strategy(subject: JobUnderCheck) -> list[str]:
    """The strategy's own `check_job` (what it cannot run: clipping on ps, ...)."""
    job = subject.job
    get_strategy_class(job.strategy).check_job(job, subject.world_size)
    return []


def check_recovery(subject: JobUnderCheck) -> list[str]:
    """`cluster.recovery: live` only with a strategy that can re-form its group."""
    job = subject.job
    strategy_class = get_strategy_class(job.strategy)
    check_live_recovery(job, strategy_class, local=subject.world_size == 1)
    return [f"recovery: {job.cluster.recovery}"] if job.cluster.recovery == "live" else []


def check_live_optimizers(subject: JobUnderCheck) -> list[str]:
    """`cluster.recovery: live` re-forms one strategy; a task stepping several optimizers in
    turn (each its own strategy) keeps the restart path."""
    job = subject.job
    if job.cluster.recovery != "live" or subject.world_size == 1:
        return []
    from roundhouse.trainer.task import build_job_task  # imports every task

    groups = resolve_optimizers(build_job_task(job, subject.info), job, subject.model)
    if len(groups) > 1:
        raise JobFileError(
            f"cluster.recovery=live re-forms one optimizer's strategy, but the task steps "
            f"{len(groups)} optimizers ({', '.join(g.name for g in groups)})",
            "set cluster.recovery=restart (a lost worker restarts the group from the latest "
            "checkpoint)",
        )
    return []


def check_ledger(subject: JobUnderCheck) -> list[str]:
    """`trainer.ledger` only with in-memory training data and plain data parallel."""
    check_ledger_job(subject.job)
    return (
        ["ledger: every rank records the samples of each step"]
        if subject.job.trainer.ledger
        else []
    )


def check_batch(subject: JobUnderCheck) -> list[str]:
    """The batch splits evenly into ranks, micro-steps and micro-batches."""
    topo = subject.topology or Topology.of_job(subject.job, subject.world_size).check()
    subject.topology = topo.check_batch()
    return [
        f"world {topo.world_size} = {topo.data_parallel} data-parallel x "
        f"{topo.model_parallel} model-parallel ({subject.job.strategy.kind})",
        f"batch: global {topo.global_batch} = {topo.data_parallel} rank(s) x "
        f"{topo.grad_accum_steps} micro-step(s) x {topo.micro_batch_text()} samples per "
        "micro-batch",
    ]


def check_task(subject: JobUnderCheck) -> list[str]:
    """The data fits the model's task (no images for a language model)."""
    job, info = subject.job, subject.info
    subject.splits.check_task(models.get(job.model.name).loss, job.model.name)
    resolve_job_task(job, info)  # value targets need a regression loss and model
    lines = [
        f"data {job.data.source or job.data.train.url}: train {info.num_samples['train']}, "
        f"val {info.num_samples['val']}, test {info.num_samples['test']}"
    ]
    if subject.topology is not None:
        steps_per_epoch = subject.topology.steps_per_epoch(info.num_samples["train"])
        total = compute_total_steps(job, steps_per_epoch)
        lines.append(f"steps: {steps_per_epoch} per epoch, {total} in total")
    return lines


def check_shapes(subject: JobUnderCheck) -> list[str]:
    """A meta batch of the task's `example_inputs` goes through the model; reports the model's
    size, the inputs' and the output's shapes.

    A model whose forward needs real values (`.item()`, data-dependent shapes) cannot run on
    the meta device: its shapes are left unchecked, with a warning, rather than refused.
    """
    job, model, shape = subject.job, subject.model, tuple(subject.info.input_shape)
    task = build_job_task(job, subject.info)
    example = task.example_inputs(shape, subject.splits.input_dtype, 2, "meta")
    num_params = sum(p.numel() for p in model.parameters())
    head = f"model {job.model.name}:{job.model.flavor}: {num_params:,} parameters, "
    head += example.describe()
    try:
        with torch.device("meta"):
            out = model(*example.args, **example.kwargs)
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "meta" in first.lower() or isinstance(exc, NotImplementedError):
            logger.warning("shapes of %s not checked on the meta device: %s", job.model.name, first)
            return [f"{head} (output shape not checked: the forward needs real values)"]
        raise ModelError(
            f"model {job.model.name}:{job.model.flavor} cannot take {example.describe()}: {first}",
            "set data.image_size larger, pick another model/flavor, or declare the model's "
            "inputs in the task's example_inputs",
        ) from None
    return [f"{head} -> output {output_shape(out)}"]


def output_shape(out: object) -> tuple[int, ...] | str:
    """One sample's output shape (of the first tensor of a tuple or dict output)."""
    if isinstance(out, dict):
        out = next(iter(out.values()), None)
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    return tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else type(out).__name__


def check_finetune(job: JobSpec, model: torch.nn.Module) -> LoadReport | None:
    """Run `init_from`, `freeze` and `param_groups` against `model` (meta is fine); raise the
    one-line error a bad job would hit at start."""
    report = apply_finetune(model, job)
    check_param_groups(trainable_names(model), job.trainer.optimizer)
    return report


def check_starting_weights(subject: JobUnderCheck) -> list[str]:
    """`init_from`, `freeze` and `param_groups` on the meta model; the per-group counts."""
    job = subject.job
    loaded = check_finetune(job, subject.model)
    apply_lora(subject.model, job)  # LoRA freezes the base: the counts the run logs
    lines = group_counts(subject.model, job.trainer.optimizer)
    if loaded:
        lines.append(
            f"init_from {job.model.init_from}: {loaded.loaded} tensors, {loaded.skipped} skipped"
        )
    return lines


def check_lora(subject: JobUnderCheck) -> list[str]:
    """The LoRA targets match Linear or Conv layers of the model."""
    job = subject.job
    if job.model.lora is None:
        return []
    matched = check_targets(subject.model, job.model.lora, job.model.name)
    return [f"lora: {len(matched)} layer(s) get adapters"]


def check_distill(subject: JobUnderCheck) -> list[str]:
    """The teacher (a run with a complete checkpoint, or a Hugging Face folder) exists and has
    the student's output space."""
    from roundhouse.weights.saved_model import find_checkpoint, read_run_job

    job, info = subject.job, subject.info
    if job.trainer.distill is None:
        return []
    check_distill_task(job, info)
    url = job.trainer.distill.teacher
    if is_hf_teacher(url):
        teacher = read_hf_teacher(url)
        check_hf_teacher(job, teacher, student_outputs(job, info), tuple(info.input_shape))
    else:
        run_dir, _ = find_checkpoint(url, None)
        teacher_job = read_run_job(run_dir)
        teacher_info = build_splits(teacher_job.data, seed=teacher_job.trainer.seed).info
        check_teacher(job, teacher_job, info, teacher_info)
    return [f"distill: teacher {url}"]


def check_distill_task(job: JobSpec, info: DataInfo) -> None:
    """Distillation mixes the teacher's soft targets into the one training loss of the task:
    a task that steps several optimizers (a GAN) has no such loss, so it is refused."""
    names = [spec.name for spec in build_job_task(job, info).optimizers()]
    if len(names) > 1:
        raise JobFileError(
            f"trainer.distill cannot train task {task_name(job, info)}: it steps "
            f"{len(names)} optimizers ({', '.join(names)}), and distillation mixes a teacher's "
            "soft targets into one training loss",
            "remove trainer.distill, or distill a task with one optimizer",
        )


# The registered checks, in the order they run. Names are what `preflight(skip=...)` takes.
CHECKS: dict[str, Check] = {
    "names": check_names,
    "world": check_world,
    "recovery": check_recovery,  # before the layout: names the first thing a user must change
    "layout": check_layout,
    "strategy": check_strategy,
    "batch": check_batch,
    "ledger": check_ledger,
    "task": check_task,
    "shapes": check_shapes,
    "lora": check_lora,  # on the plain model: targets name its layers
    "finetune": check_starting_weights,
    "optimizers": lambda subject: check_task_optimizers(subject.job, subject.model, subject.info),
    "live_optimizers": check_live_optimizers,  # after the optimizers' own check
    "distill": check_distill,
}
# The checks of a job's own strategy and layout: skipped where the strategy is chosen later
# (`strategy.kind: auto` on submit) or per row (`plan`).
STRATEGY_CHECKS = ("world", "layout", "strategy", "recovery", "batch", "live_optimizers")
