"""Multi-head attention and rotary position embeddings (SEEDS A13), shared by GPT, BERT and MoE.

Self-attention learns only the query, key and value maps (plus, with several heads, the output
map that mixes the concatenated heads; S3:1705-1723). Each head attends in its own `dim /
num_heads` subspace: 8 heads on a 3x512 input give 8 x (3x64), concatenated back to 3x512
(SEEDS F18). The kernel is `F.scaled_dot_product_attention`, which picks flash or
memory-efficient attention on a GPU.

RoPE (S3:1663-1691) rotates each pair of dimensions `(2i, 2i+1)` of q and k (never v) by the
angle `m * theta_i`, `theta_i = base^(-2i/d)` (RoFormer). A rotation keeps norms, and rotating q
by `m * theta` and k by `n * theta` makes `q . k` depend on `m - n` only. Angles are computed per
call, so a model trained on T tokens still runs (extrapolates) on longer inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.errors import ModelError

logger = logging.getLogger(__name__)

ROPE_BASE = 10000.0


def rope_angles(
    num_positions: int, head_dim: int, *, offset: int = 0, base: float = ROPE_BASE, device=None
) -> tuple[Tensor, Tensor]:
    """`cos` and `sin` of `m * theta_i` for positions `offset .. offset + num_positions - 1`.

    Returns:
        Two `(T, head_dim // 2)` float32 tensors.
    """
    if head_dim % 2:
        raise ModelError(f"RoPE needs an even head dimension, got {head_dim}", "change dim/heads")
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    positions = torch.arange(offset, offset + num_positions, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates pairs `(x[..., 2i], x[..., 2i+1])` of `x` `(B, H, T, D)` by the given angles."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, D/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)  # (B, H, T, D)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """`(B, T, C)` -> `(B, H, T, C / H)`."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """`(B, H, T, D)` -> `(B, T, H * D)`: the heads' outputs concatenated."""
    return x.transpose(1, 2).flatten(2)


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, for one attention layer.

    Attributes:
        k: `(B, H, P, D)` keys of the P cached positions, None before the first call.
        v: `(B, H, P, D)` values.
    """

    k: Tensor | None = None
    v: Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached positions P."""
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Appends this call's keys and values; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def causal_mask(num_queries: int, num_keys: int, device=None) -> Tensor:
    """Bool `(Tq, Tk)` mask: query i (the last Tq of Tk positions) sees keys 0..Tk-Tq+i."""
    offset = num_keys - num_queries
    rows = torch.arange(num_queries, device=device).unsqueeze(1)
    return torch.arange(num_keys, device=device).unsqueeze(0) <= rows + offset


class MultiHeadAttention(nn.Module):
    """Multi-head (self- or cross-) attention with optional RoPE and KV cache.

    Args:
        dim: Model width C; the output has the same width (no layer changes the shape).
        num_heads: H; each head works on `C / H` dimensions.
        bias: Bias on the q/k/v/out maps.
        dropout: Attention dropout probability (training only).
        rope: Rotate q and k with RoPE (self-attention only).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        rope: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ModelError(
                f"dim {dim} is not divisible by num_heads {num_heads}",
                "pick a number of heads that divides the width",
            )
        self.num_heads, self.head_dim, self.dropout, self.rope = (
            num_heads,
            dim // num_heads,
            dropout,
            rope,
        )
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def project(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q from `x`, k and v from `context` (or `x`): each `(B, H, T, D)`."""
        source = x if context is None else context
        q = split_heads(self.q_proj(x), self.num_heads)
        k = split_heads(self.k_proj(source), self.num_heads)
        v = split_heads(self.v_proj(source), self.num_heads)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        *,
        context: Tensor | None = None,
        causal: bool = False,
        key_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Attends from `x` `(B, T, C)` to `context` `(B, S, C)` (cross) or to `x` (self).

        Args:
            x: Queries' input.
            context: Keys'/values' input for cross-attention; None for self-attention.
            causal: Position i sees positions <= i only (decoder self-attention).
            key_padding_mask: Bool `(B, S)`, True where a key is padding and must be ignored.
            cache: Past keys/values; this call's are appended, and RoPE positions continue
                from the cached length.

        Returns:
            `(B, T, C)`.
        """
        q, k, v = self.project(x, context)  # (B, H, T, D), (B, H, S, D) x2
        past = 0 if cache is None else cache.length
        if self.rope:
            # x's length, not q's: torch.onnx traces q's as a constant (q is reshaped).
            cos, sin = rope_angles(x.shape[1], self.head_dim, offset=past, device=x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, H, past + T, D)
        mask = self.build_mask(q.shape[2], k.shape[2], causal, key_padding_mask, x.device)
        use_causal_flag = causal and mask is None
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=use_causal_flag,
        )  # (B, H, T, D)
        return self.out_proj(merge_heads(out))  # (B, T, C)

    @staticmethod
    def build_mask(
        num_queries: int, num_keys: int, causal: bool, key_padding_mask: Tensor | None, device
    ) -> Tensor | None:
        """A bool mask (True = may attend) when SDPA's `is_causal` flag cannot express it.

        `is_causal` aligns the mask to the top-left corner, which is wrong once queries start
        after cached keys, so that case (and padding) gets an explicit mask.
        """
        mask = None
        if causal and num_queries != num_keys:
            mask = causal_mask(num_queries, num_keys, device)  # (T, S)
        if key_padding_mask is not None:
            keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S)
            mask = keep if mask is None else keep & mask
            if causal and num_queries == num_keys:
                mask = mask & causal_mask(num_queries, num_keys, device)
        return mask
