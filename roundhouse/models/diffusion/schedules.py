"""Noise schedules of DDPM (SEEDS A24): the betas, their cumulative products and `q_sample`.

The forward process adds Gaussian noise step by step; in practice `x_t` is drawn from `x_0` in
one step, `x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`, with `abar_t = prod_{s<=t}(1 - beta_s)`.
Betas increase with t, so a larger t means a smaller `abar_t` and more noise (S3:3513-3531).

Two schedules, computed exactly as diffusers does (float32), so the parity tests can compare:
- `linear`: `beta_t` evenly spaced from `beta_start` to `beta_end` (Ho et al., 2020);
- `cosine`: Nichol & Dhariwal's `abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)`, `s = 0.008`,
  turned into betas capped at 0.999 (diffusers' `squaredcos_cap_v2`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from roundhouse.errors import ModelError

logger = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine")
COSINE_OFFSET = 0.008
MAX_BETA = 0.999


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """`(T,)` float32 betas evenly spaced from `beta_start` to `beta_end`."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float32)


def cosine_betas(num_steps: int, max_beta: float = MAX_BETA) -> Tensor:
    """`(T,)` float32 betas of the cosine schedule: `beta_t = 1 - abar(t+1)/abar(t)`, capped."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
        for i in range(num_steps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


@dataclass(frozen=True)
class NoiseSchedule:
    """Betas and cumulative alphas for `num_steps` training timesteps.

    Attributes:
        betas: `(T,)` float32, increasing.
        alphas_cumprod: `(T,)` float32, `abar_t`, decreasing from ~1 towards 0.
    """

    betas: Tensor
    alphas_cumprod: Tensor

    @property
    def num_steps(self) -> int:
        """Training timesteps `T`."""
        return int(self.betas.shape[0])

    def abar(self, t: int) -> Tensor:
        """`abar_t` for one timestep; `abar_{-1} = 1` (no noise before the first step)."""
        return self.alphas_cumprod[t] if t >= 0 else torch.ones((), dtype=torch.float32)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """`x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`, with `t` `(B,)` int64."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype)  # (B,)
        abar = abar.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ..., 1)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def build_schedule(
    name: str = "linear", num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> NoiseSchedule:
    """The `linear` or `cosine` schedule over `num_steps` timesteps.

    Raises:
        ModelError: An unknown schedule name or a non-positive number of steps.
    """
    if name not in SCHEDULES:
        raise ModelError(f"unknown beta schedule {name!r}", f"valid: {', '.join(SCHEDULES)}")
    if num_steps < 2:
        raise ModelError(f"num_train_timesteps must be >= 2, got {num_steps}", None)
    betas = (
        linear_betas(num_steps, beta_start, beta_end)
        if name == "linear"
        else cosine_betas(num_steps)
    )
    return NoiseSchedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))
