"""The task registry: the job's `task:` (a name or `package.module:Class`) -> its `Task`.

Without `task:` a model's `ModelSpec.loss` names its task, as before tasks were open: the CNN
zoo is `classification`; sequence, diffusion and GAN models bring their own. The base class
and its contract are in `roundhouse.trainer.task_api`. A new built-in task is a module and one
line in `TASKS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from roundhouse import models
from roundhouse.config import JobSpec, LossConfig
from roundhouse.data import DataInfo
from roundhouse.errors import ModelError
from roundhouse.trainer.losses import LossFn, build_loss, mixed_loss, topk_correct
from roundhouse.trainer.task_api import OptimizerSpec, Task, TaskError
from roundhouse.trainer.tasks_diffusion import DiffusionTask, VAETask
from roundhouse.trainer.tasks_lm import LanguageModelTask, MaskedLMTask
from roundhouse.trainer.tasks_regression import build_regression_task, resolve_job_task
from roundhouse.trainer.tasks_seq2seq import Seq2SeqTask
from roundhouse.trainer.tasks_text import TextClassificationTask, TokenClassificationTask


class ClassificationTask(Task):
    """Logits (B, K) against integer targets (B,); metrics: loss, top-1 and top-5 accuracy.
    `export` writes the model, dynamic in the batch."""

    export_kind = "classifier"
    export_scored = True

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits `(B, K)` of the batch's inputs."""
        return model(batch["input"])

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The job's loss of logits `(B, K)` against targets `(B,)`."""
        return mixed_loss(self.loss_fn, outputs.float(), batch)

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        return ("loss", "accuracy", "top5_accuracy")

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed loss, top-1 and top-5 hits and the count of one evaluation batch."""
        target = batch["target"]
        count = torch.tensor(float(target.shape[0]), device=outputs.device)
        return {
            "loss": self.loss(outputs, batch).detach() * count,
            "correct": topk_correct(outputs, target, 1).float(),
            "correct_top5": topk_correct(outputs, target, 5).float(),
            "count": count,
        }

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss and accuracies from sums over every rank."""
        n = max(sums["count"], 1.0)
        return {
            "loss": sums["loss"] / n,
            "accuracy": sums["correct"] / n,
            "top5_accuracy": sums["correct_top5"] / n,
        }


TaskFactory = Callable[[JobSpec, dict[str, Any]], Task]


def _classification(job: JobSpec, options: dict[str, Any]) -> Task:
    return ClassificationTask(build_loss(job.trainer.loss))


def _language_model(job: JobSpec, options: dict[str, Any]) -> Task:
    return LanguageModelTask(label_smoothing=job.trainer.loss.label_smoothing)


MASKINGS = ("dynamic", "static")


def _masked_lm(job: JobSpec, options: dict[str, Any]) -> Task:
    unknown = sorted(set(options) - {"masking"})
    if unknown:
        raise TaskError(
            f"unknown option {unknown[0]!r} for task masked_lm", "valid options: masking"
        )
    masking = options.get("masking", "dynamic")
    if masking not in MASKINGS:
        raise TaskError(
            f"task.options.masking must be dynamic or static, got {masking!r}",
            "set task.options.masking to dynamic (a fresh mask each epoch) or static",
        )
    return MaskedLMTask(
        label_smoothing=job.trainer.loss.label_smoothing, dynamic=masking == "dynamic"
    )


def _gan(job: JobSpec, options: dict[str, Any]) -> Task:
    from roundhouse.trainer.tasks_gan import GANTask  # only GAN jobs need it

    return GANTask.from_job(job, **options)


# Registered tasks: name -> factory. A new built-in task is one line here.
TASKS: dict[str, TaskFactory] = {
    "classification": _classification,
    "language_model": _language_model,
    "masked_lm": _masked_lm,
    "vae": lambda job, options: VAETask(**options),
    "diffusion": lambda job, options: DiffusionTask(**options),
    "gan": _gan,
    "regression": lambda job, options: build_regression_task(job.trainer.loss),
    "text_classification": lambda job, options: TextClassificationTask(
        label_smoothing=job.trainer.loss.label_smoothing
    ),
    "token_classification": lambda job, options: TokenClassificationTask(
        label_smoothing=job.trainer.loss.label_smoothing
    ),
    "seq2seq": lambda job, options: Seq2SeqTask.from_job(job),
}


def task_name(job: JobSpec, info: DataInfo | None = None) -> str:
    """The job's task: `task.name`, else the model's own (`ModelSpec.loss`), which value
    targets in the data (`info`, where known) turn into `regression`."""
    if job.task.name:
        return job.task.name
    if info is not None:
        return resolve_job_task(job, info)
    return models.get(job.model.name).loss


def build_job_task(job: JobSpec, info: DataInfo | None = None) -> Task:
    """The `Task` of `job` (its `task:` section, or its model's task), with its options.

    Raises:
        TaskError: The name is neither registered nor an importable `module:Class`, or the
            class is not a `Task`.
    """
    return build_named_task(job, task_name(job, info))


def build_named_task(job: JobSpec, name: str) -> Task:
    """The task `name` (registered, or `package.module:Class`) built for `job`."""
    if name in TASKS:
        return TASKS[name](job, dict(job.task.options))
    cls = load_task_class(name)
    return cls.from_job(job, **job.task.options)


def load_task_class(path: str) -> type[Task]:
    """The `Task` subclass that `package.module:Class` names.

    Raises:
        TaskError: Not registered, not importable, no such attribute, or not a `Task`.
    """
    valid = ", ".join(TASKS)
    if ":" not in path:
        raise TaskError(
            f"task {path!r} is not registered", f"valid: {valid}, or package.module:Class"
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of a user's module is a job-file error
        first = (str(exc).splitlines() or [""])[0]
        raise TaskError(
            f"task {path!r} does not import: {type(exc).__name__}: {first}",
            "check the module path and that it is on PYTHONPATH",
        ) from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskError(
            f"task {path!r} is not a Task class (it is {cls!r})",
            "name a subclass of roundhouse.trainer.task_api.Task",
        )
    return cls


def build_task(kind: str, loss: LossConfig) -> Task:
    """The built-in task `kind` with the job's loss settings (the planner's cost model).

    Raises:
        ModelError: `kind` is not a registered task.
    """
    if kind not in TASKS:
        raise ModelError(f"model task {kind!r} is not supported", f"valid: {', '.join(TASKS)}")
    job = SimpleNamespace(trainer=SimpleNamespace(loss=loss))
    return TASKS[kind](job, {})  # type: ignore[arg-type]


__all__ = [
    "OptimizerSpec",
    "Task",
    "TaskError",
    "build_job_task",
    "build_named_task",
    "build_task",
    "task_name",
]
