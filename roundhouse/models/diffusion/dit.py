"""DiT (Peebles & Xie, 2023): a Transformer denoiser over (latent) patches, adaLN conditioning.

The input `(B, C, H, W)` is cut into `p x p` patches, each linearly embedded into a token, plus
a fixed 2-D sine-cosine position code. The conditioning vector `c` is the timestep embedding
plus the pooled condition tokens (for class conditioning: the class embedding, as in DiT). Each
block is adaLN-Zero: `c` regresses a shift, scale and gate for the LayerNorm before the
attention and before the MLP (`x + gate * f(LN(x) * (1 + scale) + shift)`), zero-initialised so
every block starts as the identity. A final adaLN layer maps tokens back to patches of noise.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.attention import MultiHeadAttention
from roundhouse.models.diffusion.blocks import FeedForward, TimestepMLP, timestep_embedding

logger = logging.getLogger(__name__)


def sincos_2d(height: int, width: int, dim: int) -> Tensor:
    """`(H * W, dim)`: half the dimensions code the row, half the column."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.cat([timestep_embedding(rows, dim // 2), timestep_embedding(cols, dim // 2)], 1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: `x * (1 + scale) + shift`, the per-sample `(B, C)` terms broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Self-attention and MLP with adaLN-Zero modulation from the conditioning vector."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.ada[-1].weight)
        nn.init.zeros_(self.ada[-1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """An adaLN-Zero Transformer block over tokens `x` `(B, N, D)` under `c` `(B, D)`."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)  # (B, D) x6
        x = x + gate1[:, None] * self.attn(modulate(self.ln1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.ln2(x), shift2, scale2))


class DiT(nn.Module):
    """`(B, C, H, W)` noisy input, `(B,)` timesteps, context -> `(B, C, H, W)` predicted noise.

    Args:
        image: `(C, H, W)` of the input; H and W divisible by `patch_size`.
        dim: Token width D (also the condition tokens' width).
        depth: Number of DiT blocks.
        num_heads: Attention heads.
        patch_size: p.
        mlp_ratio: MLP hidden width / D.
    """

    def __init__(
        self,
        image: tuple[int, int, int],
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        patch_size: int = 2,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        c, h, w = image
        if h % patch_size or w % patch_size:
            raise ModelError(
                f"DiT patch size {patch_size} does not divide the input {h}x{w}",
                "pick a patch_size that divides the (latent) image size",
            )
        self.image, self.patch = image, patch_size
        self.grid = (h // patch_size, w // patch_size)
        self.embed = nn.Conv2d(c, dim, patch_size, stride=patch_size)
        self.register_buffer("pos", sincos_2d(*self.grid, dim)[None], persistent=False)
        self.time = TimestepMLP(dim, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.final_ln = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final = nn.Linear(dim, patch_size * patch_size * c)
        for layer in (self.final_ada[-1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def condition_vector(self, t: Tensor, context: Tensor | None, pad: Tensor | None) -> Tensor:
        """`c = t_emb + mean of the (unpadded) condition tokens`: `(B, D)`."""
        c = self.time(t)
        if context is None:
            return c
        keep = torch.ones(context.shape[:2], device=c.device) if pad is None else (~pad).float()
        pooled = (context * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        return c + pooled

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, pad: Tensor | None = None
    ) -> Tensor:
        """Predicted noise, shaped like `x`, at timesteps `t` under the optional `context`."""
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        c = self.condition_vector(t, context, pad)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_ln(tokens), shift, scale))  # (B, N, p*p*C)
        return self.unpatchify(out)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """`(B, N, p*p*C)` -> `(B, C, H, W)`."""
        c, (gh, gw), p = self.image[0], self.grid, self.patch
        x = tokens.reshape(-1, gh, gw, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(-1, c, gh * p, gw * p)
