"""A user's task whose model takes two inputs (an image and its noise level), loaded by import
path: its `example_inputs` declare both, so the shape check, `models summary` and `export`
feed the model what training feeds it. `UndeclaredDenoise` is the same task without them."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.trainer.task_api import ExampleInputs, Task


class LevelDenoiser(nn.Module):
    """`(noisy image (B, C, H, W), noise level (B, 1))` -> the clean image `(B, C, H, W)`."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 16) -> None:
        super().__init__()
        dim = math.prod(input_shape)
        self.body = nn.Sequential(nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim))

    def forward(self, noisy: Tensor, level: Tensor) -> Tensor:
        """The clean image the model sees under the noise."""
        return self.body(torch.cat([noisy.flatten(1), level], 1)).view_as(noisy)


class UndeclaredDenoise(Task):
    """Denoise digits at a random noise level; the model's inputs are not declared."""

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's clean image for a noisier copy of the batch's images."""
        x = batch["input"]
        level = torch.rand(x.shape[0], 1, device=x.device)
        return model(x + level.view(-1, 1, 1, 1) * torch.randn_like(x), level)

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean squared error to the clean images."""
        return F.mse_loss(outputs.float(), batch["input"].float())


class Denoise(UndeclaredDenoise):
    """The same task, declaring the model's two inputs."""

    def example_inputs(
        self, input_shape: tuple[int, ...], dtype: torch.dtype, batch_size: int, device: Any
    ) -> ExampleInputs:
        """A noisy image and its noise level per sample."""
        image = torch.zeros((batch_size, *input_shape), dtype=dtype, device=device)
        level = torch.zeros((batch_size, 1), device=device)
        return ExampleInputs((image, level), names=("image", "level"))


class DenoiseAndReport(Denoise):
    """The same task, whose `roundhouse sample` prints how much the model changes an image at
    the noise level `--prompt` (a user's own sampling, text out, taking only `--prompt`)."""

    can_sample = True
    sample_kind = "text"
    sample_options = frozenset({"prompt"})

    def sample_output(self, model: nn.Module, request: Any, job: Any) -> str:
        """The mean absolute change the model makes to a zero image at the given level."""
        level = float(request.prompt or 0.0)
        shape = tuple(job.data.options.get("shape", (1, 8, 8)))
        with torch.no_grad():
            clean = model(torch.zeros(1, *shape), torch.full((1, 1), level))
        return f"level {level}: mean change {clean.abs().mean().item():.6f}"
