"""Multi-head attention and rotary position embeddings (SEEDS A13), shared by GPT, BERT and MoE.

Self-attention learns only the query, key and value maps (plus, with several heads, the output
map that mixes the concatenated heads; S3:1705-1723). Each head attends in its own `dim /
num_heads` subspace: 8 heads on a 3x512 input give 8 x (3x64), concatenated back to 3x512
(SEEDS F18). The kernel is `F.scaled_dot_product_attention`, which picks flash or
memory-efficient attention on a GPU.

RoPE (S3:1663-1691) rotates each pair of dimensions `(2i, 2i+1)` of q and k (never v) by the
angle `m * theta_i`, `theta_i = base^(-2i/d)` (RoFormer). A rotation keeps norms, and rotating q
by `m * theta` and k by `n * theta` makes `q . k` depend on `m - n` only. The angle tables are
computed once per device/dtype for the longest length seen (`RopeTables`) and sliced, so a model
trained on T tokens still runs (extrapolates) on longer inputs. In float32/float64 (outside
torch.compile, whose inductor has no complex kernels) each pair is read as one complex number
and multiplied by `e^(i m theta)`: one pass, about 6x faster than the alternative on a CPU.
Otherwise (bf16/fp16, compiled) the rotation is `x * cos + swap_pairs(x) * signed_sin` in the
input's dtype: three elementwise passes instead of the split/stack of the textbook form, which
cost gpt:small 30% of its throughput on a CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.common import is_tracing

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
    """Rotates pairs `(x[..., 2i], x[..., 2i+1])` of `x` `(B, H, T, D)` by the given angles.

    `cos`/`sin` are `(T, D/2)` (from `rope_angles`) or already `(T, D)` with each angle repeated
    for its pair and the sign of the pair's first component folded into `sin` (from
    `RopeTables`). Differentiable in `x` only (the angles are constants).
    """
    if use_complex(x):
        if cos.shape[-1] * 2 == x.shape[-1]:
            rot = torch.complex(cos.to(x.dtype), sin.to(x.dtype))
        else:  # (T, D) tables: the pair's angle is repeated, its sine signed (-s, +s)
            rot = torch.complex(cos[..., 0::2].to(x.dtype), sin[..., 1::2].to(x.dtype))
        return RotateComplex.apply(x, rot)
    if cos.shape[-1] * 2 == x.shape[-1]:
        cos, sin = expand_angles(cos, sin)
    return rotate_pairs_of(x, cos.to(x.dtype), sin.to(x.dtype))


COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def use_complex(x: Tensor) -> bool:
    """Whether `x` rotates as complex numbers: float32/float64, and not inside torch.compile,
    a trace or an ONNX export (neither inductor nor ONNX has complex kernels)."""
    return x.dtype in COMPLEX_OF and not is_graph_capture()


def is_graph_capture() -> bool:
    """Whether the model runs under torch.compile, `torch.jit.trace` or `torch.onnx.export`.

    These take the real-arithmetic pairs form without the autograd.Function wrapper, which the
    exporters would otherwise have to inline.
    """
    return torch.compiler.is_compiling() or is_tracing() or torch.jit.is_scripting()


def complex_rotate(x: Tensor, rot: Tensor) -> Tensor:
    """`x` `(..., D)` read as `D/2` complex pairs, times `rot` `(..., D/2)` (broadcast)."""
    strides_even = all(stride % 2 == 0 for stride in x.stride()[:-1])
    if x.stride(-1) != 1 or x.storage_offset() % 2 or not strides_even:
        x = x.contiguous()
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (..., D/2)
    return torch.view_as_real(pairs * rot).flatten(-2)  # (..., D)


class RotateComplex(torch.autograd.Function):
    """RoPE as a complex multiply; backward multiplies by the conjugate (the rotation by
    `-theta`), one pass each way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rot: Tensor) -> Tensor:
        """Rotate `x` by the complex unit angles `rot`."""
        ctx.save_for_backward(rot)
        return complex_rotate(x, rot)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        """The gradient rotated back by the conjugate angles."""
        (rot,) = ctx.saved_tensors
        return complex_rotate(grad, rot.conj()), None


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`x * cos + swap_pairs(x) * sin` with `(T, D)` tables: one multiply, one swap, one FMA."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (x * cos).addcmul_(swapped, sin)


class RotatePairs(torch.autograd.Function):
    """RoPE's rotation with a hand-written backward: the gradient of a rotation by `theta` is
    the rotation of the incoming gradient by `-theta`, so backward is the same three passes
    (autograd's own graph of the forward costs six, plus the accumulation of two branches).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate `x`'s pairs by the angles of the `cos`/`sin` tables."""
        ctx.save_for_backward(cos, sin)
        return rotate_pairs(x, cos, sin)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        """The gradient rotated back by the negated angles."""
        cos, sin = ctx.saved_tensors
        return rotate_pairs(grad, cos, -sin), None, None


def rotate_pairs_of(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The pairs rotation: through `RotatePairs` when training, plainly under a trace or export
    (an out-of-place multiply-add, which every exporter writes as ONNX Mul/Add)."""
    if is_tracing():
        swapped = x.reshape(*x.shape[:-1], -1, 2).flip(-1).flatten(-2)
        return x * cos + swapped * sin
    return RotatePairs.apply(x, cos, sin)


def expand_angles(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`(T, D/2)` angles -> `(T, D)`: each repeated for its pair, `sin` signed `(-s, +s)`."""
    signed = torch.stack((-sin, sin), dim=-1).flatten(-2)  # (T, D)
    # stack/flatten rather than repeat_interleave: the ONNX exporter gives the latter a fixed length
    return torch.stack((cos, cos), dim=-1).flatten(-2), signed


class RopeTables:
    """`(T, D)` cos/sin tables (see `expand_angles`), or `(T, D/2)` complex rotations, cached
    per device and dtype.

    Computed once for the longest length seen so far (doubling), then sliced: a training step
    no longer recomputes them in every layer. Kept out of `state_dict` (a plain attribute, not a
    buffer), so checkpoints are unchanged.
    """

    def __init__(self, head_dim: int, base: float = ROPE_BASE) -> None:
        self.head_dim, self.base = head_dim, base
        self.tables: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        self.rotations: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def rotate(self, x: Tensor, offset: int) -> Tensor:
        """`x` `(B, T, H, D)` rotated for positions `offset .. offset + T - 1`."""
        length = x.shape[1]
        if use_complex(x):
            rot = self.rotation(length, offset, x.device, COMPLEX_OF[x.dtype])  # (T, D/2)
            return RotateComplex.apply(x, rot[:, None])
        if is_tracing():
            # Fresh tables, so the exported graph computes them for its input's length.
            cos, sin = expand_angles(
                *rope_angles(length, self.head_dim, offset=offset, base=self.base, device=x.device)
            )
            return rotate_pairs_of(x, cos[:, None].to(x.dtype), sin[:, None].to(x.dtype))
        cos, sin = self.get(length, offset, x.device, x.dtype)
        return rotate_pairs_of(x, cos[:, None], sin[:, None])

    def rotation(self, length: int, offset: int, device, dtype: torch.dtype) -> Tensor:
        """`e^(i m theta)` for positions `offset .. offset + length - 1`: `(length, D/2)`."""
        key = (torch.device(device), dtype)
        cached = self.rotations.get(key)
        end = offset + length
        if cached is None or cached.shape[0] < end:
            size = max(end, 2 * cached.shape[0] if cached is not None else end)
            cos, sin = rope_angles(size, self.head_dim, base=self.base, device=device)
            cached = self.rotations[key] = torch.complex(cos, sin).to(dtype)
        return cached[offset:end]

    def get(self, length: int, offset: int, device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Tables for positions `offset .. offset + length - 1`, each `(length, D)`."""
        key = (torch.device(device), dtype)
        cached = self.tables.get(key)
        end = offset + length
        if cached is None or cached[0].shape[0] < end:
            size = max(end, 2 * cached[0].shape[0] if cached is not None else end)
            cos, sin = rope_angles(size, self.head_dim, base=self.base, device=device)
            cos, sin = expand_angles(cos, sin)
            cached = (cos.to(dtype), sin.to(dtype))
            self.tables[key] = cached
        return cached[0][offset:end], cached[1][offset:end]


def unflatten_heads(x: Tensor, num_heads: int) -> Tensor:
    """`(B, T, C)` -> `(B, T, H, C / H)` (a view when contiguous).

    Not `unflatten`: torch.onnx exports it with the traced sizes, which would fix the sequence
    length of an exported RoPE model.
    """
    return x.reshape(*x.shape[:-1], num_heads, -1)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """`(B, T, C)` -> `(B, H, T, C / H)`."""
    return unflatten_heads(x, num_heads).transpose(1, 2)


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
        self.rope_tables = RopeTables(self.head_dim) if rope else None

    def project(
        self, x: Tensor, context: Tensor | None, offset: int = 0
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q from `x`, k and v from `context` (or `x`): each `(B, H, T, D)`.

        With RoPE, q and k are rotated for positions from `offset` while still in the maps'
        contiguous `(B, T, H, D)` layout, which is faster than rotating the transposed heads.
        """
        source = x if context is None else context
        q = unflatten_heads(self.q_proj(x), self.num_heads)  # (B, T, H, D)
        k = unflatten_heads(self.k_proj(source), self.num_heads)
        if self.rope_tables is not None:
            q, k = self.rope_tables.rotate(q, offset), self.rope_tables.rotate(k, offset)
        v = split_heads(self.v_proj(source), self.num_heads)
        return q.transpose(1, 2), k.transpose(1, 2), v

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
        past = 0 if cache is None else cache.length
        q, k, v = self.project(x, context, past)  # (B, H, T, D), (B, H, S, D) x2
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
