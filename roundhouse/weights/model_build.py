"""The job's model and the seeds it is built under: what training, export, a distillation
teacher and the launch-time checks all build the same way (no import of the training run)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.data import Splits, build_splits
from roundhouse.weights.finetune import resolve_build


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    """Seed Python, NumPy and torch; on CUDA, ask for deterministic kernels.

    CPU kernels are already deterministic run to run (the bit-for-bit tests check this), and
    `use_deterministic_algorithms` costs ~30% on CPU: some backward kernels then raise a
    warning, with a Python traceback, on every call.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def build_model_for(
    job: JobSpec, input_shape: tuple[int, ...], num_classes: int
) -> torch.nn.Module:
    """The job's model for inputs of `input_shape` (per sample) and `num_classes` outputs.

    A Hugging Face `model.init_from` adds its architecture to the options (see `finetune`).
    """
    options, num_classes = resolve_build(job, job.model.options, num_classes)
    config = models.BuildConfig(
        flavor=job.model.flavor,
        input_shape=input_shape,
        num_classes=num_classes,
        options=options,
    )
    return models.build_model(job.model.name, config)


def build_model_with_data(job: JobSpec) -> tuple[torch.nn.Module, Splits]:
    """The job's data splits and its model built for their shapes, on the current device.

    Raises:
        DataError: the data does not fit the model's task (images for a language model).
    """
    splits = build_splits(job.data, seed=job.trainer.seed)
    splits.check_task(models.get(job.model.name).loss, job.model.name)
    model = build_model_for(job, splits.info.input_shape, splits.info.num_classes)
    return model, splits
