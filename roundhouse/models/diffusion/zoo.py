"""Registered diffusion models: `ddpm` (pixel UNet), `ldm` (UNet on VAE latents), `dit`.

Options every one of them takes (model.options in a job file): `condition` (`none`, `class`,
`text`), `schedule` (`linear`, `cosine`), `num_train_timesteps`, `p_uncond` (condition dropout
for classifier-free guidance). `ldm` needs `vae_checkpoint` (the stage-1 run); `dit` takes it
optionally (latent DiT with it, pixel DiT without). `latent_scale` overrides the calibrated one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from roundhouse.errors import ModelError
from roundhouse.models.common import image_shape
from roundhouse.models.diffusion.dit import DiT
from roundhouse.models.diffusion.ldm import (
    LatentDiffusionModel,
    calibrate_latent_scale,
    load_stage1_vae,
)
from roundhouse.models.diffusion.model import DiffusionModel, build_diffusion_model
from roundhouse.models.diffusion.unet import UNet, check_unet_input
from roundhouse.models.registry import ModelSpec, register

logger = logging.getLogger(__name__)


def _latent_setup(
    name: str, input_shape: tuple[int, ...], vae_checkpoint: str | None, latent_scale: float | None
) -> tuple[tuple[int, int, int], dict]:
    """`(diffused shape, extra model kwargs)`: pixels, or a frozen VAE's latents."""
    image = image_shape(name, input_shape)
    if vae_checkpoint is None:
        return image, {"clip_sample": 1.0}
    vae, stage1 = load_stage1_vae(vae_checkpoint, image)
    scale = latent_scale if latent_scale is not None else calibrate_latent_scale(vae, stage1)
    extra = {"clip_sample": None, "model_cls": LatentDiffusionModel, "vae": vae}
    return tuple(vae.latent_shape), extra | {"latent_scale": scale}


def build_ddpm(
    input_shape: tuple[int, ...],
    num_classes: int,
    base_channels: int = 32,
    channel_mults: Sequence[int] = (1, 2),
    num_res_blocks: int = 1,
    attn_levels: Sequence[int] = (1,),
    num_heads: int = 4,
    context_dim: int = 64,
    condition: str = "class",
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
    p_uncond: float = 0.1,
    dropout: float = 0.0,
    vae_checkpoint: str | None = None,
    latent_scale: float | None = None,
) -> DiffusionModel:
    """A UNet noise predictor over pixels, or over VAE latents when `vae_checkpoint` is set."""
    shape, extra = _latent_setup("ddpm", input_shape, vae_checkpoint, latent_scale)
    check_unet_input("ddpm", shape, 2 ** (len(channel_mults) - 1))
    net = UNet(
        shape[0],
        base_channels,
        tuple(channel_mults),
        num_res_blocks,
        tuple(attn_levels),
        num_heads,
        None if condition == "none" else context_dim,
        dropout,
    )
    return build_diffusion_model(
        net,
        shape,
        condition=condition,
        context_dim=context_dim,
        num_classes=num_classes,
        schedule=schedule,
        num_train_timesteps=num_train_timesteps,
        p_uncond=p_uncond,
        **extra,
    )


def build_ldm(input_shape: tuple[int, ...], num_classes: int, **kwargs) -> DiffusionModel:
    """`build_ddpm` on the latents of the stage-1 VAE that `vae_checkpoint` names (required)."""
    if not kwargs.get("vae_checkpoint"):
        raise ModelError(
            "model ldm needs model.options.vae_checkpoint (the stage-1 VAE run)",
            "train configs/vae_digits.yaml first and set vae_checkpoint to its run folder",
        )
    return build_ddpm(input_shape, num_classes, **kwargs)


def build_dit(
    input_shape: tuple[int, ...],
    num_classes: int,
    dim: int = 128,
    depth: int = 4,
    num_heads: int = 4,
    patch_size: int = 2,
    mlp_ratio: int = 4,
    condition: str = "class",
    schedule: str = "linear",
    num_train_timesteps: int = 1000,
    p_uncond: float = 0.1,
    vae_checkpoint: str | None = None,
    latent_scale: float | None = None,
) -> DiffusionModel:
    """A DiT over pixels, or over VAE latents when `vae_checkpoint` is set."""
    shape, extra = _latent_setup("dit", input_shape, vae_checkpoint, latent_scale)
    net = DiT(shape, dim, depth, num_heads, patch_size, mlp_ratio)
    return build_diffusion_model(
        net,
        shape,
        condition=condition,
        context_dim=dim,
        num_classes=num_classes,
        schedule=schedule,
        num_train_timesteps=num_train_timesteps,
        p_uncond=p_uncond,
        **extra,
    )


UNET_FLAVORS = {
    "debug": {"base_channels": 8, "num_heads": 2, "context_dim": 16},
    "small": {"base_channels": 32, "num_heads": 4, "context_dim": 64},
    "base": {"base_channels": 64, "channel_mults": (1, 2, 2), "attn_levels": (1, 2)},
}

DDPM_SPEC = register(
    ModelSpec(
        name="ddpm",
        flavors=UNET_FLAVORS,
        builder=build_ddpm,
        description="DDPM/DDIM: UNet (ResNet + spatial-transformer blocks) predicting noise",
        loss="diffusion",
    )
)
LDM_SPEC = register(
    ModelSpec(
        name="ldm",
        flavors=UNET_FLAVORS,
        builder=build_ldm,
        description="latent diffusion: UNet on a frozen stage-1 VAE's latents (vae_checkpoint)",
        loss="diffusion",
    )
)
DIT_SPEC = register(
    ModelSpec(
        name="dit",
        flavors={
            "debug": {"dim": 32, "depth": 2, "num_heads": 2},
            "small": {"dim": 128, "depth": 4, "num_heads": 4},
            "base": {"dim": 384, "depth": 12, "num_heads": 6},
        },
        builder=build_dit,
        description="DiT: Transformer over (latent) patches with adaLN-Zero conditioning",
        loss="diffusion",
    )
)
