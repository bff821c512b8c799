"""Tasks: how a model's outputs become a loss and evaluation metrics.

A `ModelSpec.loss` names its task. The CNN zoo is `classification`; sequence and diffusion models
bring their own tasks. Strategies call `forward` and `loss`; the evaluation loop sums
`eval_sums` over batches and ranks, then `finalize` turns sums into metrics.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from roundhouse.config import LossConfig
from roundhouse.errors import ModelError
from roundhouse.parallel.base import StepTask
from roundhouse.trainer.losses import LossFn, build_loss, mixed_loss, topk_correct
from roundhouse.trainer.tasks_diffusion import DiffusionTask, VAETask
from roundhouse.trainer.tasks_lm import LanguageModelTask, MaskedLMTask
from roundhouse.trainer.tasks_regression import REGRESSION, build_regression_task
from roundhouse.trainer.tasks_seq2seq import Seq2SeqTask
from roundhouse.trainer.tasks_text import TextClassificationTask, TokenClassificationTask


class Task(StepTask, Protocol):
    """What the trainer needs to know about a family of models (strategies use only the
    `StepTask` part: `forward` and `loss`)."""

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's outputs for `batch` (what `loss` and `eval_sums` take)."""

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The scalar training loss of one micro-batch (a mean over its samples)."""

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Metric sums of one evaluation batch; they add up over batches and ranks."""

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics (`loss`, `accuracy`, ...) from the sums over every batch and rank."""


class ClassificationTask:
    """Logits (B, K) against integer targets (B,); metrics: loss, top-1 and top-5 accuracy."""

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits `(B, K)` of the batch's inputs."""
        return model(batch["input"])

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The job's loss of logits `(B, K)` against targets `(B,)`."""
        return mixed_loss(self.loss_fn, outputs.float(), batch)

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


def build_task(kind: str, loss: LossConfig) -> Task:
    """The task a model's `ModelSpec.loss` names."""
    if kind == "classification":
        return ClassificationTask(build_loss(loss))
    if kind == REGRESSION:
        return build_regression_task(loss)
    # Imported here: the text tasks pull in the tokenizer, which classification never needs.

    if kind == "language_model":
        return LanguageModelTask(label_smoothing=loss.label_smoothing)
    if kind == "masked_lm":
        return MaskedLMTask(label_smoothing=loss.label_smoothing)

    if kind == "text_classification":
        return TextClassificationTask(label_smoothing=loss.label_smoothing)
    if kind == "token_classification":
        return TokenClassificationTask(label_smoothing=loss.label_smoothing)
    if kind == "seq2seq":
        return Seq2SeqTask(label_smoothing=loss.label_smoothing)
    if kind == "vae":
        return VAETask()
    if kind == "diffusion":
        return DiffusionTask()
    raise ModelError(
        f"model task {kind!r} is not supported",
        "valid: classification, regression, language_model, masked_lm, text_classification, "
        "token_classification, seq2seq, vae, diffusion",
    )
