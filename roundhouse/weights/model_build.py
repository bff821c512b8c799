"""The job's model and the seeds it is built under: what training, export, a distillation
teacher and the launch-time checks all build the same way (no import of the training run)."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.data import Splits, build_splits
from roundhouse.data.transforms import InputNormalizer, resolve_normalize
from roundhouse.errors import DataError
from roundhouse.models.spec import TORCHVISION_PREFIX
from roundhouse.weights.finetune import resolve_build

logger = logging.getLogger(__name__)


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
    job: JobSpec, input_shape: tuple[int, ...], num_classes: int, vocab_size: int | None = None
) -> torch.nn.Module:
    """The job's model for inputs of `input_shape` (per sample) and `num_classes` outputs.

    `vocab_size` is the data's token vocabulary (`DataInfo.vocab_size`) for text. A Hugging
    Face `model.init_from` adds its architecture to the options (see `finetune`).
    """
    options, num_classes = resolve_build(job, job.model.options, num_classes, vocab_size)
    config = models.BuildConfig(
        flavor=job.model.flavor,
        input_shape=input_shape,
        num_classes=num_classes,
        options=options,
    )
    model = models.build_model(job.model.name, config)
    apply_input_normalize(model, job, input_shape)
    return model


def build_model_with_data(job: JobSpec) -> tuple[torch.nn.Module, Splits]:
    """The job's data splits and its model built for their shapes, on the current device.

    Raises:
        DataError: the data does not fit the model's task (images for a language model).
    """
    splits = build_splits(job.data, seed=job.trainer.seed)
    splits.check_task(models.get(job.model.name).loss, job.model.name)
    info = splits.info
    model = build_model_for(job, info.input_shape, info.num_classes, info.vocab_size)
    return model, splits


def is_torchvision_init(job: JobSpec) -> bool:
    """Whether `model.init_from` holds torchvision's ImageNet weights: a `torchvision:` model
    with an `init_from`, or a `.pth` file (torchvision's own weight files)."""
    url = job.model.init_from
    if url is None:
        return False
    return job.model.name.startswith(TORCHVISION_PREFIX) or url.endswith(".pth")


def apply_input_normalize(
    model: torch.nn.Module, job: JobSpec, input_shape: tuple[int, ...]
) -> InputNormalizer | None:
    """Register `data.normalize` on image models as a forward pre-hook (see `InputNormalizer`).

    A torchvision `init_from` gets ImageNet's mean and std unless `data.normalize` says
    otherwise (`none` turns it off); the choice is logged.
    """
    value = job.data.normalize
    if value is None and is_torchvision_init(job) and len(input_shape) == 3:
        value = "imagenet"
        logger.info("data.normalize: imagenet (the default for a torchvision model.init_from)")
    if value is not None and value != "none" and len(input_shape) != 3:
        raise DataError(
            f"data.normalize needs image inputs (C, H, W), got shape {tuple(input_shape)}",
            "remove data.normalize",
        )
    stats = resolve_normalize(value, int(input_shape[0]))
    if stats is None:
        return None
    normalizer = InputNormalizer(*stats)
    model.register_forward_pre_hook(normalizer)
    return normalizer
