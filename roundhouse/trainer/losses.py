"""Losses: cross-entropy (with label smoothing), focal, MSE, L1 and Huber; the step's weights.

Every loss maps (outputs, targets) to a scalar mean over the batch, so the trainer can weight
micro-batches by their size (`step_weights`: by their loss items, for a task that declares
them). Classification passes logits `(B, K)` and integer targets `(B,)`
(MSE, L1 and Huber then compare with one-hot rows); regression (`tasks_regression`) passes
outputs and float targets of the same shape, compared as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from roundhouse.config import LossConfig
from roundhouse.errors import JobFileError

LossFn = Callable[[Tensor, Tensor], Tensor]


def focal_loss(
    logits: Tensor, target: Tensor, gamma: float = 2.0, alpha: float | None = 0.25
) -> Tensor:
    """Focal loss (Lin et al. 2017), multi-class form: -alpha (1 - p_t)^gamma log p_t.

    Easy examples (p_t -> 1) are down-weighted by (1 - p_t)^gamma; gamma = 0 and alpha = None
    is plain cross-entropy (SEEDS B2, S2:271-282).
    """
    log_p = F.log_softmax(logits.float(), dim=-1)  # (B, K)
    log_pt = log_p.gather(1, target.unsqueeze(1)).squeeze(1)  # (B,)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = alpha * loss
    return loss.mean()


def _one_hot(logits: Tensor, target: Tensor) -> Tensor:
    """Integer labels as one-hot rows; float value targets (regression) as they are."""
    if target.is_floating_point():
        return target.to(logits.dtype)
    return F.one_hot(target, num_classes=logits.shape[-1]).to(logits.dtype)


LOSSES: dict[str, Callable[[LossConfig], LossFn]] = {
    "cross_entropy": lambda c: (
        lambda x, y: F.cross_entropy(x, y, label_smoothing=c.label_smoothing)
    ),
    "focal": lambda c: lambda x, y: focal_loss(x, y, c.focal_gamma, c.focal_alpha),
    "mse": lambda c: lambda x, y: F.mse_loss(x, _one_hot(x, y)),
    "l1": lambda c: lambda x, y: F.l1_loss(x, _one_hot(x, y)),
    "huber": lambda c: lambda x, y: F.huber_loss(x, _one_hot(x, y), delta=c.huber_delta),
}


def build_loss(config: LossConfig) -> LossFn:
    """The loss named by `trainer.loss.name`; unknown names list the valid ones."""
    if config.name not in LOSSES:
        raise JobFileError(
            f"unknown loss trainer.loss.name={config.name!r}",
            f"valid: {', '.join(sorted(LOSSES))}",
        )
    return LOSSES[config.name](config)


def mixed_loss(loss_fn: LossFn, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """The loss of a batch, mixup-aware: lam * L(y_a) + (1 - lam) * L(y_b)."""
    loss = loss_fn(outputs, batch["target"])
    if "mix_lam" not in batch:
        return loss
    lam = batch["mix_lam"].to(loss.dtype)
    return lam * loss + (1.0 - lam) * loss_fn(outputs, batch["target_b"])


def topk_correct(logits: Tensor, target: Tensor, k: int) -> Tensor:
    """How many rows have `target` among their `k` largest logits (k capped at K)."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # (B, k)
    return (top == target.unsqueeze(1)).any(dim=1).sum()


@dataclass(frozen=True)
class StepWeights:
    """How the loop weights the micro-batches of one optimizer step on this rank.

    Attributes:
        scales: Each micro-batch's `loss_scale` (the contract in `parallel/base.py`).
        counts: Each micro-batch's weight in the step's reported loss (its samples, or its
            loss items), so the reported loss is this rank's sample (item) mean.
    """

    scales: list[float]
    counts: list[float]


def step_weights(
    samples: Sequence[int],
    items: Sequence[int] | None,
    step_size: int,
    dp: int,
    global_items: float | None,
) -> StepWeights:
    """The `loss_scale` of each micro-batch so that, after the strategy averages gradients
    over its `dp` ranks, the gradient is that of the global batch's mean loss.

    Args:
        samples: Each micro-batch's sample count on this rank.
        items: Each micro-batch's loss items (`Task.loss_items`); None: the loss is a mean
            per sample and micro-batches weigh `samples / step_size`.
        step_size: Samples in the whole global batch (every rank).
        dp: Data-parallel ranks whose gradients the strategy averages.
        global_items: The loss items of the whole global batch (every micro-batch of every
            rank); a micro-batch then weighs `items / global_items`, so its loss, a mean over
            its items, counts each item once, as one device on the whole batch would. None
            (ranks without a common step: asynchronous ps): this rank keeps its sample share
            of the step and spreads it over its micro-batches by their items.
    """
    if items is None:
        return StepWeights([n / step_size * dp for n in samples], [float(n) for n in samples])
    if global_items is None:
        share = sum(samples) / step_size / max(sum(items), 1)
        return StepWeights([k * share * dp for k in items], [float(k) for k in items])
    total = max(global_items, 1.0)
    return StepWeights([k / total * dp for k in items], [float(k) for k in items])


__all__ = [
    "LOSSES",
    "LossFn",
    "StepWeights",
    "build_loss",
    "focal_loss",
    "mixed_loss",
    "step_weights",
    "topk_correct",
    "torch",
]
