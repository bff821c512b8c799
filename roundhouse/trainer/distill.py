"""`trainer.distill`: knowledge distillation from a frozen teacher (Hinton et al., 2015).

`DistillTask` wraps the student's own task. Its training loss is

    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * task loss

averaged per sample (classifiers) or per counted token (language models: `PAD` targets are
left out, as in the task loss). Every strategy calls `task.forward` and `task.loss`, so the
teacher runs on every rank, next to the student's forward, frozen, in eval mode, under no_grad.
Evaluation adds `teacher_agreement`: the share of samples (tokens) where the student's top-1
prediction is the teacher's.

The teacher is a roundhouse run folder or checkpoint, or a Hugging Face GPT-2/BERT folder
(`hf_teacher`); it may have another architecture as long as it has the student's task, input
and output space (checked by `check_teacher` / `check_hf_teacher`, up front).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse import models
from roundhouse.config import DistillConfig, JobSpec
from roundhouse.data import DataInfo, Splits
from roundhouse.errors import JobFileError
from roundhouse.trainer.task import Task
from roundhouse.weights.hf_teacher import (
    build_hf_teacher,
    check_hf_teacher,
    is_hf_teacher,
    read_hf_teacher,
)

logger = logging.getLogger(__name__)

DISTILLABLE = ("classification", "language_model", "masked_lm")


def distill_loss(
    student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None
) -> Tensor:
    """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, mean over rows.

    Args:
        student: logits `(..., K)`.
        teacher: logits of the same shape.
        temperature: T.
        mask: `(...)` booleans, the rows that count (None: all).
    """
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_row = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # (...)
    if mask is not None:
        per_row = per_row[mask]
    return per_row.sum() / max(per_row.numel(), 1) * temperature**2


def token_mask(outputs: Tensor, batch: dict[str, Tensor]) -> Tensor | None:
    """Language models: the positions whose target is not `PAD` (None for classifiers)."""
    if outputs.dim() < 3:
        return None
    from roundhouse.data.text import PAD_ID

    return batch["target"] != PAD_ID


class DistillTask(Task):
    """The student's task with a teacher's soft targets mixed into the training loss."""

    def __init__(self, task: Task, teacher: nn.Module, config: DistillConfig) -> None:
        self.task = task
        self.teacher = teacher
        self.config = config
        self.teacher_outputs: Tensor | None = None

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The student's outputs; the teacher's for the same inputs are kept for `loss`."""
        outputs = self.task.forward(model, batch)
        with torch.no_grad():
            self.teacher_outputs = self.teacher(batch["input"])
        return outputs

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """alpha x T^2-scaled KL to the teacher's softened outputs + (1 - alpha) x the task loss."""
        task_loss = self.task.loss(outputs, batch)
        teacher = self._teacher_for(outputs, batch)
        kd = distill_loss(outputs, teacher, self.config.temperature, token_mask(outputs, batch))
        return self.config.alpha * kd + (1 - self.config.alpha) * task_loss

    def _teacher_for(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The teacher's logits for this batch (pipeline stages call `loss` without `forward`)."""
        teacher = self.teacher_outputs
        if teacher is None or teacher.shape != outputs.shape:
            with torch.no_grad():
                teacher = self.teacher(batch["input"])
        self.teacher_outputs = None
        return teacher

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The task's evaluation sums plus the count of predictions that agree with the teacher."""
        sums = self.task.eval_sums(outputs, batch)
        teacher = self._teacher_for(outputs, batch)
        agree = outputs.argmax(dim=-1) == teacher.argmax(dim=-1)
        mask = token_mask(outputs, batch)
        if mask is not None:
            agree = agree[mask]
        sums["teacher_agree"] = agree.sum().float()
        sums["teacher_rows"] = torch.tensor(float(agree.numel()), device=outputs.device)
        return sums

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """The task's metrics plus `teacher_agreement`."""
        agree, rows = sums.pop("teacher_agree", 0.0), sums.pop("teacher_rows", 0.0)
        metrics = self.task.finalize(sums)
        metrics["teacher_agreement"] = agree / max(rows, 1.0)
        return metrics


def check_teacher(job: JobSpec, teacher_job: JobSpec, student: DataInfo, teacher: DataInfo) -> None:
    """The teacher must have the student's task, input shape and output space."""
    ours, theirs = models.get(job.model.name).loss, models.get(teacher_job.model.name).loss
    if ours not in DISTILLABLE:
        raise JobFileError(
            f"trainer.distill needs a classifier or language model; {job.model.name} is {ours}",
            "remove trainer.distill",
        )
    mismatch = []
    if theirs != ours:
        mismatch.append(f"task {theirs} vs {ours}")
    if teacher.num_classes != student.num_classes:
        mismatch.append(f"{teacher.num_classes} outputs vs {student.num_classes}")
    if tuple(teacher.input_shape) != tuple(student.input_shape):
        mismatch.append(f"input {tuple(teacher.input_shape)} vs {tuple(student.input_shape)}")
    if mismatch:
        raise JobFileError(
            f"trainer.distill.teacher {job.trainer.distill.teacher!r} has another output space "
            f"than the student ({', '.join(mismatch)})",
            "distil from a teacher trained on the same data and task",
        )


def load_teacher(job: JobSpec, student: DataInfo, device: torch.device) -> nn.Module:
    """The job's teacher, checked, with adapters merged, frozen, in eval mode, on `device`."""
    url = job.trainer.distill.teacher
    if is_hf_teacher(url):
        teacher, described = load_hf_teacher(job, student), "Hugging Face"
    else:
        from roundhouse.weights.saved_model import load_saved_model

        saved = load_saved_model(url, merge=True)
        check_teacher(job, saved.job, student, saved.splits.info)
        teacher, described = saved.model, f"{saved.job.model.name}:{saved.job.model.flavor}"
    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    logger.info(
        "distilling from %s (%s, %s parameters)",
        url,
        described,
        f"{sum(p.numel() for p in teacher.parameters()):,}",
    )
    return teacher


def student_outputs(job: JobSpec, student: DataInfo) -> int:
    """The student's logits per position (a Hugging Face `init_from` brings its vocabulary)."""
    from roundhouse.weights.finetune import resolve_build

    return resolve_build(job, job.model.options, student.num_classes)[1]


def load_hf_teacher(job: JobSpec, student: DataInfo) -> nn.Module:
    """The Hugging Face folder `trainer.distill.teacher`, checked against the student."""
    teacher = read_hf_teacher(job.trainer.distill.teacher)
    check_hf_teacher(job, teacher, student_outputs(job, student), tuple(student.input_shape))
    return build_hf_teacher(teacher)


def build_distill_task(job: JobSpec, task: Task, splits: Splits, device: torch.device) -> Task:
    """`task` itself, or wrapped in a `DistillTask` when the job sets `trainer.distill`."""
    config = job.trainer.distill
    if config is None:
        return task
    return DistillTask(task, load_teacher(job, splits.info, device), config)
