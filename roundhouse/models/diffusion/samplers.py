"""Samplers over one trained noise predictor: DDPM ancestral, DDIM, classifier-free guidance.

DDPM (SEEDS A24, Ho et al. eq. 7 and 15): from `x_t` and the predicted noise, estimate
`x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`, take the posterior mean
`mu = sqrt(abar_prev) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t`
and add `sigma_t z` with FRESH noise `z` every step, `sigma_t^2 = (1 - abar_prev) / (1 - abar_t)
beta_t` (diffusers' `fixed_small`). Without that noise the samples come out blank (S3:3547).

DDIM (SEEDS A25, Song et al. eq. 12): the same model, a non-Markovian update that may skip
steps: `x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - s^2) eps + s z`,
`s = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)`. `eta = 0` is
deterministic, `eta = 1` matches DDPM's variance.

With fewer steps than training timesteps both use diffusers' "leading" spacing: timesteps
`(n-1)k, ..., k, 0` with `k = T // n`, and the previous timestep of `t` is `t - k`
(`abar_{-1} = 1`). Step functions match diffusers' `DDPMScheduler.step` /
`DDIMScheduler.step` (epsilon prediction, `clip_sample` on the `x_0` estimate) bit for bit on
float32; the parity tests check this.

Classifier-free guidance (Ho & Salimans): `eps = eps_u + w (eps_c - eps_u)`; `w = 0` is the
unconditional model, `w = 1` the conditional one, `w > 1` pushes samples towards the condition.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from roundhouse.errors import ModelError
from roundhouse.models.diffusion.schedules import NoiseSchedule

logger = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddim")


class Denoiser(Protocol):
    """What a sampler needs from a diffusion model (see `DiffusionModel`)."""

    schedule: NoiseSchedule
    clip_sample: float | None

    def denoise(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Predicted noise for `x` at timesteps `t` under `cond`, shaped like `x`."""

    def null_condition(self, cond: Tensor) -> Tensor:
        """The "no condition" input of the same batch (classifier-free guidance)."""


def inference_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """Descending timesteps for `num_steps` sampling steps ("leading" spacing, as diffusers).

    Raises:
        ModelError: `num_steps` is not in `1..num_train_steps`.
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ModelError(
            f"--steps {num_steps} is outside 1..{num_train_steps} (the training timesteps)",
            "pick fewer sampling steps",
        )
    stride = num_train_steps // num_steps
    return [i * stride for i in reversed(range(num_steps))]


def predict_x0(
    schedule: NoiseSchedule, eps: Tensor, t: int, x: Tensor, clip: float | None
) -> Tensor:
    """`x_0` estimated from `x_t` and the predicted noise, clamped to `[-clip, clip]`."""
    abar_t = schedule.abar(t)
    x0 = (x - (1 - abar_t) ** 0.5 * eps) / abar_t**0.5
    return x0 if clip is None else x0.clamp(-clip, clip)


def ddpm_step(
    schedule: NoiseSchedule,
    eps: Tensor,
    t: int,
    prev_t: int,
    x: Tensor,
    noise: Tensor,
    clip: float | None = 1.0,
) -> tuple[Tensor, Tensor]:
    """One ancestral step `x_t -> x_prev`; `noise` is fresh N(0, I) (unused at t = 0).

    Returns:
        `(x_prev, x0_estimate)`.
    """
    abar_t, abar_prev = schedule.abar(t), schedule.abar(prev_t)
    alpha_t = abar_t / abar_prev
    beta_t = 1 - alpha_t
    x0 = predict_x0(schedule, eps, t, x, clip)
    x0_coef = abar_prev**0.5 * beta_t / (1 - abar_t)
    xt_coef = alpha_t**0.5 * (1 - abar_prev) / (1 - abar_t)
    mean = x0_coef * x0 + xt_coef * x
    if t == 0:
        return mean, x0
    variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
    return mean + variance**0.5 * noise, x0


def ddim_step(
    schedule: NoiseSchedule,
    eps: Tensor,
    t: int,
    prev_t: int,
    x: Tensor,
    noise: Tensor | None = None,
    eta: float = 0.0,
    clip: float | None = 1.0,
) -> tuple[Tensor, Tensor]:
    """One DDIM step `x_t -> x_prev` (`noise` needed only when `eta > 0`).

    Returns:
        `(x_prev, x0_estimate)`.
    """
    abar_t, abar_prev = schedule.abar(t), schedule.abar(prev_t)
    x0 = predict_x0(schedule, eps, t, x, clip)
    variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
    std = eta * variance**0.5
    x_prev = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + std * noise
    return x_prev, x0


def guided_eps(
    denoise: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    x: Tensor,
    t: Tensor,
    cond: Tensor | None,
    null_cond: Tensor | None,
    guidance: float,
) -> Tensor:
    """Classifier-free guided noise `eps_u + w (eps_c - eps_u)`.

    `w = 1` (or no condition) runs only the conditional model, `w = 0` only the unconditional
    one; otherwise both run in one batch.
    """
    if cond is None or guidance == 1.0:
        return denoise(x, t, cond)
    if guidance == 0.0:
        return denoise(x, t, null_cond)
    both = denoise(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null_cond]))
    eps_c, eps_u = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@dataclass(frozen=True)
class SamplerConfig:
    """How to sample.

    Attributes:
        sampler: `"ddpm"` (ancestral) or `"ddim"`.
        num_steps: Sampling steps (<= the training timesteps).
        eta: DDIM's stochasticity (0 = deterministic); ignored by DDPM.
        guidance: Classifier-free guidance weight w (1 = plain conditional).
    """

    sampler: str = "ddim"
    num_steps: int = 50
    eta: float = 0.0
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ModelError(f"unknown sampler {self.sampler!r}", f"valid: {', '.join(SAMPLERS)}")
        if self.guidance < 0 or self.eta < 0:
            raise ModelError("guidance and eta must be >= 0", "pass e.g. --guidance 3.0")


@torch.no_grad()
def sample_latents(
    model: Denoiser,
    shape: tuple[int, ...],
    num: int,
    cond: Tensor | None,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Runs the reverse process from pure noise; returns `(B, *shape)` samples in model space.

    Args:
        model: The noise predictor with its schedule.
        shape: One sample's shape (the latent shape for latent diffusion).
        num: Number of samples B (`cond` must have B rows).
        cond: `(B, ...)` conditions, or None for an unconditional model.
        config: Sampler, steps, eta, guidance.
        generator: Seeds the start noise and every step's fresh noise.
        device: Where to sample.
    """
    x = torch.randn((num, *shape), generator=generator, device=device)
    null = None if cond is None else model.null_condition(cond)
    steps = inference_timesteps(model.schedule.num_steps, config.num_steps)
    stride = model.schedule.num_steps // config.num_steps
    for t in steps:
        t_batch = torch.full((num,), t, dtype=torch.long, device=device)
        eps = guided_eps(model.denoise, x, t_batch, cond, null, config.guidance)
        noise = torch.randn(x.shape, generator=generator, device=device)  # fresh every step
        if config.sampler == "ddpm":
            x, _ = ddpm_step(model.schedule, eps, t, t - stride, x, noise, model.clip_sample)
        else:
            x, _ = ddim_step(
                model.schedule, eps, t, t - stride, x, noise, config.eta, model.clip_sample
            )
    return x
