"""A user's own model and task, outside the roundhouse package (docs/guide/tasks.md).

The model encodes a digit, classifies it, and reconstructs it from the same code. The task
trains with two optimizers stepped in turn on every batch: `body` (encoder and classifier) on
the cross-entropy, then `decoder` on the reconstruction error of the (now fixed) code.
Validation reports `loss`, `accuracy` and `recon_mse`; early stopping and tune select on
`val/accuracy` by default.

    PYTHONPATH=. roundhouse train examples/my_task.yaml --local
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.trainer.task_api import OptimizerSpec, Task, unwrap


class AutoencoderClassifier(nn.Module):
    """Flatten -> code (tanh) -> class logits; and code -> reconstructed image."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> None:
        super().__init__()
        dim = math.prod(input_shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(dim, hidden), nn.Tanh())
        self.classifier = nn.Linear(hidden, num_classes)
        self.decoder = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits `(B, K)`."""
        return self.classifier(self.encoder(x))


class ClassifyAndReconstruct(Task):
    """Cross-entropy for the body, then mean squared reconstruction error for the decoder."""

    metric = "accuracy"
    metric_mode = "max"

    def __init__(self, recon_weight: float = 1.0) -> None:
        self.recon_weight = recon_weight

    def optimizers(self) -> list[OptimizerSpec]:
        """Two optimizers, stepped in this order on every batch."""
        return [
            OptimizerSpec("body", ["encoder.*", "classifier.*"]),
            OptimizerSpec("decoder", ["decoder.*"]),
        ]

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns (tune may select on them)."""
        return ("loss", "accuracy")

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of the logits."""
        return F.cross_entropy(outputs.float(), batch["target"])

    def step_loss(self, model: nn.Module, batch: dict[str, Tensor], optimizer: str) -> Tensor:
        """The loss of `optimizer`'s turn (only its parameters have gradients)."""
        net = unwrap(model)  # the plain module inside a strategy's wrapper
        x = batch["input"]
        code = net.encoder(x)
        if optimizer == "body":
            return self.loss(net.classifier(code), batch)
        return self.recon_weight * F.mse_loss(net.decoder(code).view_as(x), x)

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed loss and hits of one evaluation batch (`outputs` are the logits)."""
        target = batch["target"]
        count = torch.tensor(float(target.shape[0]))
        return {
            "loss": self.loss(outputs, batch).detach().cpu() * count,
            "correct": (outputs.argmax(1) == target).sum().float().cpu(),
            "count": count,
        }

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Mean loss and accuracy over every batch and rank."""
        n = max(float(sums["count"]), 1.0)
        return {"loss": float(sums["loss"]) / n, "accuracy": float(sums["correct"]) / n}
