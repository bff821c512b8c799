"""`DiffusionModel`: a noise predictor, its condition encoder and its noise schedule.

The trainer's `diffusion` task and `roundhouse sample` talk to this class only; the network
inside is a `UNet` or a `DiT`, over pixels (DDPM) or over a frozen VAE's latents (LDM, see
`ldm.py`, which overrides `to_latent`/`from_latent`).

Data space: the datasets give pixels in [0, 1]; the model diffuses `2x - 1` in [-1, 1] (so the
samplers may clip the `x_0` estimate to [-1, 1], as diffusers' `clip_sample` does), or the
scaled latents of the VAE (no clipping).

`forward(x, t, cond, noise)` is the whole training computation in one call (so wrappers such as
DDP or DeepSpeed see it): `z_0 = to_latent(x)`, `z_t = q_sample(z_0, t, noise)`, and the
predicted noise `eps_theta(z_t, t, cond)`. Defaults (`t = 0`, zero noise, no condition) let a
shape check call `model(images)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.diffusion.conditioning import ConditionEncoder
from roundhouse.models.diffusion.samplers import SamplerConfig, sample_latents
from roundhouse.models.diffusion.schedules import NoiseSchedule, build_schedule

logger = logging.getLogger(__name__)

# A denoising network: (z_t (B, C, H, W), t (B,), context (B, S, D) | None, pad (B, S) | None).
Net = Callable[..., Tensor]


class DiffusionModel(nn.Module):
    """Noise predictor + condition encoder + schedule.

    Args:
        net: The denoiser (`UNet` or `DiT`), called as `net(z_t, t, context, pad)`.
        cond_encoder: Turns conditions into context tokens.
        schedule: The training noise schedule.
        latent_shape: `(C, H, W)` of what is diffused.
        p_uncond: Probability of training with the null condition (classifier-free guidance).
        clip_sample: Clamp for the sampler's `x_0` estimate, or None.
    """

    def __init__(
        self,
        net: nn.Module,
        cond_encoder: ConditionEncoder,
        schedule: NoiseSchedule,
        latent_shape: tuple[int, int, int],
        p_uncond: float = 0.1,
        clip_sample: float | None = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= p_uncond < 1.0:
            raise ModelError(f"p_uncond must be in [0, 1), got {p_uncond}", "e.g. p_uncond: 0.1")
        self.net, self.cond_encoder, self.schedule = net, cond_encoder, schedule
        self.latent_shape, self.p_uncond, self.clip_sample = latent_shape, p_uncond, clip_sample

    @property
    def condition(self) -> str:
        """`none`, `class` or `text`."""
        return self.cond_encoder.kind

    def to_latent(self, x: Tensor) -> Tensor:
        """Pixels in [0, 1] -> the diffused space ([-1, 1])."""
        return x * 2 - 1

    def from_latent(self, z: Tensor) -> Tensor:
        """The diffused space -> pixels in [0, 1]."""
        return ((z + 1) / 2).clamp(0, 1)

    def denoise(self, z: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Predicted noise `eps_theta(z_t, t, cond)`, shaped like `z`."""
        context, pad = self.cond_encoder(cond)
        return self.net(z, t, context, pad)

    def null_condition(self, cond: Tensor) -> Tensor:
        """The "no condition" input of the same batch (classifier-free guidance)."""
        return self.cond_encoder.null_condition(cond)

    def forward(
        self,
        x: Tensor,
        t: Tensor | None = None,
        cond: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Noise prediction for clean pixels `x` `(B, *data)` noised to timesteps `t` `(B,)`."""
        z0 = self.to_latent(x)  # (B, *latent_shape)
        if t is None:
            t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        noise = torch.zeros_like(z0) if noise is None else noise
        return self.denoise(self.schedule.q_sample(z0, t, noise), t, cond)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        config: SamplerConfig,
        cond: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`num` images `(num, C, H, W)` in [0, 1], guided towards `cond` (`(num, ...)`)."""
        device = next(self.parameters()).device
        z = sample_latents(self, self.latent_shape, num, cond, config, generator, device)
        return self.from_latent(z)


def build_diffusion_model(
    net: nn.Module,
    latent_shape: tuple[int, int, int],
    *,
    condition: str,
    context_dim: int,
    num_classes: int,
    schedule: str,
    num_train_timesteps: int,
    p_uncond: float,
    clip_sample: float | None = 1.0,
    model_cls: type[DiffusionModel] = DiffusionModel,
    **extra,
) -> DiffusionModel:
    """Wraps `net` with a condition encoder and the named schedule."""
    return model_cls(
        net,
        ConditionEncoder(condition, context_dim, num_classes),
        build_schedule(schedule, num_train_timesteps),
        latent_shape,
        p_uncond=p_uncond,
        clip_sample=clip_sample,
        **extra,
    )


def find_diffusion_model(model: nn.Module) -> DiffusionModel:
    """The `DiffusionModel` inside `model` (itself, or inside a wrapper)."""
    for module in model.modules():
        if isinstance(module, DiffusionModel):
            return module
    raise ModelError("the model is not a diffusion model", "use ddpm, ldm or dit")
