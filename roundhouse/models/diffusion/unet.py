"""The denoising UNet of DDPM/LDM (SEEDS A24, A26): `eps_theta(x_t, t, condition)`.

A UNet keeps the input size (S3:3459): a down path of `ResBlock`s (conditioned on the timestep
embedding) and stride-2 convs, a middle, and an up path that concatenates the down path's
feature maps (skip connections). As in latent diffusion, the plain conv+ReLU stages are ResNet
blocks followed, at the chosen resolutions, by a `SpatialTransformer`: self-attention, then
cross-attention with the image as query and the condition tokens as key/value (S3:3457-3471).
The timestep enters every ResBlock through a sinusoidal embedding and an MLP; the same network
serves every step (S3:3345-3357).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.diffusion.blocks import (
    Downsample,
    ResBlock,
    SpatialTransformer,
    TimestepMLP,
    Upsample,
    group_norm,
)

logger = logging.getLogger(__name__)


class UNetLayer(nn.Module):
    """A `ResBlock` followed by an optional `SpatialTransformer`."""

    def __init__(self, res: ResBlock, attn: SpatialTransformer | None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(
        self, x: Tensor, temb: Tensor, context: Tensor | None, pad: Tensor | None
    ) -> Tensor:
        """A residual block, then attention (to `context`, if any) when the level has it."""
        x = self.res(x, temb)
        return x if self.attn is None else self.attn(x, context, pad)


class UNet(nn.Module):
    """Predicts the noise in `x_t`: `(B, C, H, W)`, `(B,)` timesteps, context -> `(B, C, H, W)`.

    Args:
        in_channels: C of the (latent) image.
        base_channels: Width of the first level.
        channel_mults: Width multiplier per level; each level but the last halves H and W.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_levels: Levels (0 = full resolution) with a SpatialTransformer after each ResBlock;
            the middle always has one.
        num_heads: Attention heads.
        context_dim: Width of the condition tokens, or None for an unconditional model.
        dropout: Dropout inside the ResBlocks.
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attn_levels: Sequence[int] = (1,),
        num_heads: int = 4,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        temb_dim = 4 * base_channels
        self.time = TimestepMLP(base_channels, temb_dim)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def layer(cin: int, cout: int, level: int) -> UNetLayer:
            attn = None
            if level in attn_levels:
                attn = SpatialTransformer(cout, num_heads, context_dim)
            return UNetLayer(ResBlock(cin, cout, temb_dim, dropout), attn)

        widths = [base_channels * m for m in channel_mults]
        self.down, skips = build_down_path(layer, base_channels, widths, num_res_blocks)
        ch = widths[-1]
        self.mid = nn.ModuleList(
            [
                UNetLayer(
                    ResBlock(ch, ch, temb_dim, dropout),
                    SpatialTransformer(ch, num_heads, context_dim),
                ),
                UNetLayer(ResBlock(ch, ch, temb_dim, dropout), None),
            ]
        )
        self.up = build_up_path(layer, widths, num_res_blocks, skips)
        self.out = nn.Sequential(
            group_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], in_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)  # start by predicting zero noise (ADM)
        nn.init.zeros_(self.out[-1].bias)
        self.downsample_factor = 2 ** (len(channel_mults) - 1)

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, pad: Tensor | None = None
    ) -> Tensor:
        """Predicted noise `(B, C, H, W)` at timesteps `t` under the optional `context`."""
        temb = self.time(t)  # (B, 4 * base)
        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h) if isinstance(module, Downsample) else module(h, temb, context, pad)
            skips.append(h)
        for module in self.mid:
            h = module(h, temb, context, pad)
        for module in self.up:
            if isinstance(module, Upsample):
                h = module(h)
            else:
                h = module(torch.cat([h, skips.pop()], dim=1), temb, context, pad)
        return self.out(h)  # (B, C, H, W)


def build_down_path(
    layer: Callable[[int, int, int], UNetLayer], base: int, widths: list[int], num_res: int
) -> tuple[nn.ModuleList, list[int]]:
    """Down path: per level `num_res` layers, then a Downsample (not after the last level).

    Returns the modules and the channel count of every feature map the up path will
    concatenate (the stem's output first).
    """
    down, skips, ch = nn.ModuleList(), [base], base
    for level, width in enumerate(widths):
        for _ in range(num_res):
            down.append(layer(ch, width, level))
            ch = width
            skips.append(ch)
        if level != len(widths) - 1:
            down.append(Downsample(ch))
            skips.append(ch)
    return down, skips


def build_up_path(
    layer: Callable[[int, int, int], UNetLayer], widths: list[int], num_res: int, skips: list[int]
) -> nn.ModuleList:
    """Up path: per level (deepest first) `num_res + 1` layers on [h, skip], then an Upsample."""
    up, ch, skips = nn.ModuleList(), widths[-1], list(skips)
    for level in reversed(range(len(widths))):
        for _ in range(num_res + 1):
            up.append(layer(ch + skips.pop(), widths[level], level))
            ch = widths[level]
        if level != 0:
            up.append(Upsample(ch))
    return up


def check_unet_input(name: str, shape: tuple[int, int, int], factor: int) -> None:
    """Raises `ModelError` unless H and W are divisible by the UNet's downsampling factor."""
    _, h, w = shape
    if h % factor or w % factor:
        raise ModelError(
            f"model {name!r} downsamples by {factor}, but its input is {h}x{w}",
            f"set data.image_size to a multiple of {factor}, or use fewer channel_mults",
        )
