"""Building blocks shared by the VAE, the UNet and DiT (SEEDS A23, A26).

- `ResBlock`: GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected) skip; the UNet adds a
  projection of the timestep embedding between the two convs.
- `AttnBlock2d`: self-attention over the H*W pixels of a feature map (the VAE's middle).
- `SpatialTransformer` (the LDM UNet's block, S3:3457-3471): pixels become tokens; self-attention,
  then cross-attention with the IMAGE as query and the CONDITION as key/value, then an MLP, each
  pre-LayerNorm with a residual; tokens go back to a map and are added to the input.
- `timestep_embedding`: the Transformer's sinusoidal code of the (integer) timestep.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.models.attention import MultiHeadAttention


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide `channels`."""
    groups = math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """`(B,)` timesteps -> `(B, dim)` `[cos(t w_i), sin(t w_i)]`, `w_i = max_period^(-i/half)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class TimestepMLP(nn.Module):
    """Sinusoidal code of t followed by `Linear -> SiLU -> Linear` (DDPM's time embedding)."""

    def __init__(self, base_dim: int, out_dim: int) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(
            nn.Linear(base_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        """Embeddings `(B, out_dim)` of timesteps `t` `(B,)`."""
        return self.mlp(timestep_embedding(t, self.base_dim))  # (B, out_dim)


class ResBlock(nn.Module):
    """Two 3x3 convs with GroupNorm/SiLU and a residual; optional timestep conditioning."""

    def __init__(
        self, in_ch: int, out_ch: int, temb_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch) if temb_dim else None
        self.norm2, self.conv2 = group_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        """Residual block over `x` `(B, C, H, W)`, conditioned on the timestep embedding."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        if self.temb is not None and temb is not None:
            h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halves H and W with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Halve the height and width of `x` (a strided convolution)."""
        return self.conv(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Double the height and width of `x` (nearest neighbour, then a convolution)."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def to_tokens(x: Tensor) -> Tensor:
    """`(B, C, H, W)` -> `(B, H*W, C)`."""
    return x.flatten(2).transpose(1, 2)


def to_map(tokens: Tensor, height: int, width: int) -> Tensor:
    """`(B, H*W, C)` -> `(B, C, H, W)`."""
    return tokens.transpose(1, 2).unflatten(2, (height, width))


class AttnBlock2d(nn.Module):
    """Self-attention among the pixels of a feature map, with a residual (the VAE's middle)."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = MultiHeadAttention(channels, num_heads)

    def forward(self, x: Tensor) -> Tensor:
        """`x` `(B, C, H, W)` plus self-attention among its pixels."""
        _, _, h, w = x.shape
        out = self.attn(to_tokens(self.norm(x)))  # (B, HW, C)
        return x + to_map(out, h, w)


class FeedForward(nn.Module):
    """`Linear(C, 4C) -> GELU -> Linear(4C, C)`."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """The position-wise MLP of a Transformer block, shape-preserving."""
        return self.net(x)


class SpatialTransformer(nn.Module):
    """Self-attention, cross-attention to the condition, MLP, over the pixels of a map.

    Args:
        channels: C of the feature map (also the attention width).
        num_heads: Attention heads.
        context_dim: Width of the condition tokens; None for an unconditional model (then the
            cross-attention is absent).
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int | None) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.ln1, self.self_attn = nn.LayerNorm(channels), MultiHeadAttention(channels, num_heads)
        self.cross_attn = None
        if context_dim is not None:
            self.context_proj = nn.Linear(context_dim, channels)
            self.ln2 = nn.LayerNorm(channels)
            self.cross_attn = MultiHeadAttention(channels, num_heads)
        self.ln3, self.ff = nn.LayerNorm(channels), FeedForward(channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_pad: Tensor | None = None
    ) -> Tensor:
        """`x` `(B, C, H, W)`; `context` `(B, S, context_dim)`; `context_pad` `(B, S)` bool."""
        _, _, h, w = x.shape
        tokens = to_tokens(self.proj_in(self.norm(x)))  # (B, HW, C)
        tokens = tokens + self.self_attn(self.ln1(tokens))
        if self.cross_attn is not None and context is not None:
            # Queries from the image, keys and values from the condition (S3:3467-3471).
            ctx = self.context_proj(context)  # (B, S, C)
            tokens = tokens + self.cross_attn(
                self.ln2(tokens), context=ctx, key_padding_mask=context_pad
            )
        tokens = tokens + self.ff(self.ln3(tokens))
        return x + self.proj_out(to_map(tokens, h, w))
