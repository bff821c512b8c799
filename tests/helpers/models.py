"""User models for tests, loaded through the `module.path:callable` adapter."""

from __future__ import annotations

import math
import time

import torch
from torch import nn


class SlowMLP(nn.Module):
    """A small MLP that sleeps in forward, so a test can kill a run mid-training reliably.

    Sleeping changes no numbers: runs with and without the delay train identically.
    """

    def __init__(
        self, input_shape: tuple[int, ...], num_classes: int, delay_s: float = 0.01
    ) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), 32),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.delay_s)
        return self.net(x)


def slow_mlp(input_shape: tuple[int, ...], num_classes: int, delay_s: float = 0.01) -> nn.Module:
    return SlowMLP(input_shape, num_classes, delay_s)


class BranchyMLP(nn.Module):
    """An MLP whose extra branch runs only for some batches, plus a layer that never runs.

    The branch runs when the first sample's pixel sum has an even first decimal: a property of
    the batch, so data-parallel ranks disagree on it from step to step. `unused` never gets a
    gradient on any rank.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU())
        self.branch = nn.Linear(32, 32)
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(32, num_classes)

    def uses_branch(self, x: torch.Tensor) -> bool:
        return int(float(x[0].abs().sum()) * 10) % 2 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)  # (B, 32)
        if self.uses_branch(x):
            h = h + torch.relu(self.branch(h))
        return self.head(h)


def branchy_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return BranchyMLP(input_shape, num_classes)


class SpectralNet(nn.Module):
    """A classifier whose forward uses singular values: an op ONNX has no counterpart for."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.side = input_shape[-1]
        self.head = nn.Linear(self.side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.reshape(x.shape[0], -1, self.side, self.side).mean(dim=1)  # (B, S, S)
        return self.head(torch.linalg.svdvals(images))  # (B, K)


def spectral_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return SpectralNet(input_shape, num_classes)
