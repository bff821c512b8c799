"""Up-front checks for `model.lora` and `trainer.distill`, run before anything is written.

`roundhouse train` (and `--dry-run`) call `check_adaptation` after the job's own checks: LoRA
targets must match a Linear or Conv layer of the model (built on the meta device: no memory),
and the teacher must be a readable run or Hugging Face folder whose task, input and output
space are the student's.
The layouts adapters cannot run under are refused by each strategy's own `check_job`.
"""

from __future__ import annotations

import logging

import torch

from roundhouse.config import JobSpec
from roundhouse.data import DataInfo, build_splits
from roundhouse.trainer.distill import check_teacher, student_outputs
from roundhouse.trainer.hf_teacher import check_hf_teacher, is_hf_teacher, read_hf_teacher
from roundhouse.trainer.lora import check_targets

logger = logging.getLogger(__name__)


def check_adaptation(job: JobSpec) -> None:
    """Raise a `RoundhouseError` for a LoRA or distillation setting that cannot work."""
    if job.model.lora is None and job.trainer.distill is None:
        return
    info = build_splits(job.data, seed=job.trainer.seed).info
    if job.model.lora is not None:
        check_lora(job, info)
    if job.trainer.distill is not None:
        check_distill(job, info)


def check_lora(job: JobSpec, info: DataInfo) -> None:
    """The strategy supports adapters and the targets match layers of the model."""
    from roundhouse.trainer.model_build import build_model_for

    with torch.device("meta"):
        model = build_model_for(job, info.input_shape, info.num_classes, info.vocab_size)
    check_targets(model, job.model.lora, job.model.name)


def check_distill(job: JobSpec, info: DataInfo) -> None:
    """The teacher (a run with a complete checkpoint, or a Hugging Face folder) exists and has
    the student's output space."""
    from roundhouse.trainer.saved_model import find_checkpoint, read_run_job

    url = job.trainer.distill.teacher
    if is_hf_teacher(url):
        teacher = read_hf_teacher(url)
        check_hf_teacher(job, teacher, student_outputs(job, info), tuple(info.input_shape))
        return
    run_dir, _ = find_checkpoint(job.trainer.distill.teacher, None)
    teacher_job = read_run_job(run_dir)
    teacher_info = build_splits(teacher_job.data, seed=teacher_job.trainer.seed).info
    check_teacher(job, teacher_job, info, teacher_info)
