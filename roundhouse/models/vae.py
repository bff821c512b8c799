"""A KL-regularised convolutional autoencoder (VAE; SEEDS A22, A23), stage 1 of latent diffusion.

The encoder (ResNet blocks, stride-2 convs, self-attention in the middle, as the LDM's VAE,
S3:3477) maps an image to two maps, the mean `m` and `sigma` (a log standard deviation). The
code is `c = m + exp(sigma) * e`, `e ~ N(0, I)` (the reparameterization trick, S3:3218; the exp
keeps the standard deviation positive). The decoder mirrors the encoder back to pixels.

Loss (the `vae` task): reconstruction (sum of squared errors per image, on the [-1, 1] scale)
plus `kl_weight` times the KL divergence to N(0, I). The notes show the regularizer only as an
image ("sum(exp(sigma) - (1 + sigma) + m^2)", which is the KL when sigma is a log *variance*);
with sigma the log standard deviation, as in the code above, the paper's exact form (Kingma &
Welling, appendix B) is `KL = 1/2 sum(exp(2 sigma) - 1 - 2 sigma + m^2)`, which is used here.

In training the forward samples the code; in evaluation it decodes the mean (deterministic
validation metrics). `sample` decodes random codes (the decoder as a generator, S3:3200).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from roundhouse.models.common import image_shape
from roundhouse.models.diffusion.blocks import (
    AttnBlock2d,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
)
from roundhouse.models.diffusion.unet import check_unet_input
from roundhouse.models.registry import ModelSpec, register

logger = logging.getLogger(__name__)


def _middle(ch: int) -> nn.Sequential:
    return nn.Sequential(ResBlock(ch, ch), AttnBlock2d(ch), ResBlock(ch, ch))


def _out(ch: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1))


class Encoder(nn.Module):
    """`(B, C, H, W)` in [-1, 1] -> `(B, 2 * Z, H / f, W / f)`: mean and log-std maps."""

    def __init__(
        self, in_ch: int, base: int, mults: Sequence[int], num_res: int, latent_ch: int
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, base, 3, padding=1)]
        ch = base
        for level, mult in enumerate(mults):
            for _ in range(num_res):
                layers.append(ResBlock(ch, base * mult))
                ch = base * mult
            if level != len(mults) - 1:
                layers.append(Downsample(ch))
        layers += [_middle(ch), _out(ch, 2 * latent_ch)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Mean and log std, stacked along channels, of images `x` on the [-1, 1] scale."""
        return self.net(x)


class Decoder(nn.Module):
    """`(B, Z, H / f, W / f)` -> `(B, C, H, W)` on the [-1, 1] scale."""

    def __init__(
        self, out_ch: int, base: int, mults: Sequence[int], num_res: int, latent_ch: int
    ) -> None:
        super().__init__()
        ch = base * mults[-1]
        layers: list[nn.Module] = [nn.Conv2d(latent_ch, ch, 3, padding=1), _middle(ch)]
        for level, mult in reversed(list(enumerate(mults))):
            for _ in range(num_res):
                layers.append(ResBlock(ch, base * mult))
                ch = base * mult
            if level != 0:
                layers.append(Upsample(ch))
        layers.append(_out(ch, out_ch))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Images on the [-1, 1] scale decoded from latents `z`."""
        return self.net(z)


class VAE(nn.Module):
    """Encoder + decoder; `forward(x)` reconstructs pixels in [0, 1] and stores `kl_loss`.

    Attributes:
        latent_shape: `(Z, H / f, W / f)` of a code.
        kl_weight: Weight of the KL term in the `vae` task's loss.
        kl_loss: `(B,)` per-image KL of the last forward (read by the task).
    """

    def __init__(
        self,
        image: tuple[int, int, int],
        base_channels: int,
        channel_mults: Sequence[int],
        num_res_blocks: int,
        latent_channels: int,
        kl_weight: float,
    ) -> None:
        super().__init__()
        c, h, w = image
        factor = 2 ** (len(channel_mults) - 1)
        args = (base_channels, channel_mults, num_res_blocks, latent_channels)
        self.encoder, self.decoder = Encoder(c, *args), Decoder(c, *args)
        self.latent_shape = (latent_channels, h // factor, w // factor)
        self.kl_weight = kl_weight
        self.kl_loss: Tensor | None = None

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels in [0, 1] -> `(m, sigma)`, each `(B, *latent_shape)`; sigma = log std."""
        moments = self.encoder(x * 2 - 1)
        mean, log_std = moments.chunk(2, dim=1)
        return mean, log_std.clamp(-15.0, 5.0)

    def decode(self, z: Tensor) -> Tensor:
        """Codes -> pixels on the [0, 1] scale (not clamped)."""
        return (self.decoder(z) + 1) / 2

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction `(B, C, H, W)` of `x` via a sampled latent (eval: the mean); keeps KL."""
        mean, log_std = self.encode(x)
        if self.training:
            z = mean + log_std.exp() * torch.randn_like(mean)  # c = m + exp(sigma) e
        else:
            z = mean
        kl = 0.5 * ((2 * log_std).exp() - 1 - 2 * log_std + mean.square())
        self.kl_loss = kl.flatten(1).sum(dim=1)  # (B,)
        return self.decode(z)  # (B, C, H, W)

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """Decodes `num` codes drawn from N(0, I): `(num, C, H, W)` in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn((num, *self.latent_shape), generator=generator, device=device)
        return self.decode(z).clamp(0, 1)


def build_vae(
    input_shape: tuple[int, ...],
    num_classes: int,
    base_channels: int = 16,
    channel_mults: Sequence[int] = (1, 2),
    num_res_blocks: int = 1,
    latent_channels: int = 2,
    kl_weight: float = 1e-3,
) -> VAE:
    """A VAE for `(C, H, W)` images; H and W must be divisible by `2^(len(channel_mults)-1)`."""
    del num_classes  # unconditional
    image = image_shape("vae", input_shape)
    check_unet_input("vae", image, 2 ** (len(channel_mults) - 1))
    return VAE(
        image, base_channels, tuple(channel_mults), num_res_blocks, latent_channels, kl_weight
    )


SPEC = register(
    ModelSpec(
        name="vae",
        flavors={
            "debug": {"base_channels": 8, "channel_mults": (1, 2), "latent_channels": 2},
            "small": {"base_channels": 32, "channel_mults": (1, 2), "latent_channels": 2},
            "base": {"base_channels": 64, "channel_mults": (1, 2, 2), "latent_channels": 4},
        },
        builder=build_vae,
        description="KL-regularised conv autoencoder (ResNet blocks + self-attention); LDM stage 1",
        loss="vae",
    )
)
