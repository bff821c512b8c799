"""Fine-tuning tasks on text: `text_classification` and `token_classification`.

`text_classification`: logits `(B, K)` against labels `(B,)` (one per text, e.g. the package of
a docstring in `builtin:pydoc-cls`). `token_classification`: logits `(B, T, K)` against labels
`(B, T)`, where `IGNORE_LABEL` (-100, as in Hugging Face) marks positions without a label
(padding, continuation pieces).

Metrics: `loss`, `accuracy`, `macro_f1` (the unweighted mean over classes of each class's F1, so
a rare class counts as much as a common one) and per class `class<i>_f1` (`f1_metrics(...,
detail=True)` adds precision, recall and support, for reports outside the training log). They
come from per-class true-positive / false-positive / false-negative counts, which add up over
batches and ranks, so the figures are exact under every strategy.

A label outside `0..K-1` is a `DataError` (one line), not a CUDA assert or a silent wrong loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.errors import DataError
from roundhouse.trainer.task_api import Task

IGNORE_LABEL = -100


def check_labels(target: Tensor, num_classes: int) -> None:
    """Raises `DataError` when a label (other than `IGNORE_LABEL`) is outside `0..K-1`."""
    labels = target[target != IGNORE_LABEL]
    if labels.numel() and (bool((labels < 0).any()) or bool((labels >= num_classes).any())):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise DataError(
            f"label {bad} is outside the model's {num_classes} classes (0..{num_classes - 1})",
            "set the model's number of classes to the data's, or fix the labels",
        )


def class_counts(pred: Tensor, target: Tensor, num_classes: int) -> dict[str, Tensor]:
    """Per-class `tp<i>`, `fp<i>`, `fn<i>` of flat predictions against flat labels."""
    keep = target != IGNORE_LABEL
    pred, target = pred[keep], target[keep]
    classes = torch.arange(num_classes, device=pred.device)
    is_pred = pred[:, None] == classes  # (N, K)
    is_true = target[:, None] == classes
    tp = (is_pred & is_true).sum(0).float()
    fp = (is_pred & ~is_true).sum(0).float()
    fn = (~is_pred & is_true).sum(0).float()
    sums = {}
    for i in range(num_classes):
        sums |= {f"tp{i}": tp[i], f"fp{i}": fp[i], f"fn{i}": fn[i]}
    return sums


def f1_metrics(sums: dict[str, float], detail: bool = False) -> dict[str, float]:
    """`macro_f1` and the per-class F1 (with `detail`, also precision, recall and support)
    from `class_counts` sums.

    Classes absent from both the labels and the predictions are left out of the macro mean.
    """
    metrics: dict[str, float] = {}
    f1s = []
    i = 0
    while f"tp{i}" in sums:
        tp, fp, fn = (float(sums[f"{k}{i}"]) for k in ("tp", "fp", "fn"))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        if tp + fp + fn:
            f1s.append(f1)
        metrics[f"class{i}_f1"] = f1
        if detail:
            metrics |= {
                f"class{i}_precision": precision,
                f"class{i}_recall": recall,
                f"class{i}_support": tp + fn,
            }
        i += 1
    return {"macro_f1": sum(f1s) / len(f1s) if f1s else 0.0} | metrics


class TextClassificationTask(Task):
    """Label logits `(B, K)` (or `(B, T, K)` per token) against labels; cross-entropy."""

    export_kind = "classifier"
    export_scored = True

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        return ("loss", "accuracy", "macro_f1")

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's label logits for `batch["input"]` `(B, T)` token ids."""
        return model(batch["input"])

    def flat(self, outputs: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """`(N, K)` logits and `(N,)` labels, checked against K."""
        logits, target = outputs.float().flatten(0, -2), batch["target"].flatten()
        if logits.shape[0] != target.shape[0]:
            raise DataError(
                f"the model gives {logits.shape[0]} predictions for {target.shape[0]} labels",
                "text_classification needs one label per text, token_classification one per token",
            )
        check_labels(target, logits.shape[-1])
        return logits, target

    def loss_items(self, batch: dict[str, Tensor]) -> int:
        """The labelled texts (or tokens: `IGNORE_LABEL` marks none) `loss` averages over."""
        return int((batch["target"] != IGNORE_LABEL).sum())

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean cross-entropy over the labelled texts (or tokens)."""
        logits, target = self.flat(outputs, batch)
        return F.cross_entropy(
            logits, target, ignore_index=IGNORE_LABEL, label_smoothing=self.label_smoothing
        )

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed loss, hits, count and the per-class counts of one evaluation batch."""
        logits, target = self.flat(outputs, batch)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE_LABEL, reduction="sum")
        pred = logits.argmax(dim=-1)
        valid = target != IGNORE_LABEL
        sums = {
            "loss": loss.detach(),
            "correct": ((pred == target) & valid).sum().float(),
            "count": valid.sum().float(),
        }
        return sums | class_counts(pred, target, logits.shape[-1])

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss, accuracy, macro-F1 and the per-class figures."""
        n = max(float(sums["count"]), 1.0)
        metrics = {"loss": float(sums["loss"]) / n, "accuracy": float(sums["correct"]) / n}
        return metrics | f1_metrics(sums)


class TokenClassificationTask(TextClassificationTask):
    """Per-token label logits `(B, T, K)` against `(B, T)` labels (`IGNORE_LABEL`: none)."""

    export_kind = "token classifier"
    export_scored = False  # export's int8 accuracy counts PAD, not IGNORE_LABEL, as no label
