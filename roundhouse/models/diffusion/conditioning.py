"""Condition encoders for the denoisers (SEEDS A26: the third trained part of an LDM).

A condition becomes a sequence of context tokens `(B, S, D)` that the UNet's cross-attention
reads as keys and values (and DiT pools into its adaLN vector):

- `class`: `(B,)` int64 labels -> a learned embedding, one token. Label `num_classes` is the
  "no condition" token that classifier-free guidance trains with probability `p_uncond`.
- `text`: `(B, S)` byte ids (`encode_captions`) -> a small bidirectional Transformer encoder
  (BERT-style, S3:3481) over a leading start token plus the caption bytes; padding keys are
  masked. The empty caption (all padding) is the "no condition" input.

Byte ids follow `roundhouse.data.text`: bytes 0-255, PAD 256, BOS 257.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.gpt import MLP, TransformerBlock

CONDITIONS = ("none", "class", "text")
PAD_ID, BOS_ID, TEXT_VOCAB = 256, 257, 260
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def encode_captions(texts: list[str], length: int) -> Tensor:
    """UTF-8 bytes of each caption, cut or padded with PAD to `(B, length)` int64."""
    rows = []
    for text in texts:
        ids = list(text.encode("utf-8"))[:length]
        rows.append(ids + [PAD_ID] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def class_caption(label: int) -> str:
    """The caption a text-conditioned model trains with for class `label` (its number word)."""
    return NUMBER_WORDS[label] if 0 <= label < len(NUMBER_WORDS) else str(label)


class TextEncoder(nn.Module):
    """Byte embedding + non-causal Transformer blocks: `(B, S)` ids -> `(B, S + 1, D)` tokens."""

    def __init__(self, dim: int, num_layers: int = 2, num_heads: int = 4) -> None:
        super().__init__()

        self.embed = nn.Embedding(TEXT_VOCAB, dim)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, MLP(dim, 4 * dim), causal=False, rope=True)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Caption states `(B, S + 1, D)` and their padding mask `(B, S + 1)` from byte ids."""
        bos = torch.full_like(ids[:, :1], BOS_ID)
        ids = torch.cat([bos, ids], dim=1)  # (B, S + 1): BOS keeps one key unmasked
        pad = ids == PAD_ID  # (B, S + 1)
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, key_padding_mask=pad)
        return self.norm(x), pad  # (B, S + 1, D), (B, S + 1)


class ConditionEncoder(nn.Module):
    """Turns a condition tensor into context tokens; see the module docstring.

    Args:
        kind: `none`, `class` or `text`.
        dim: Width D of the context tokens.
        num_classes: Labels for `class` conditioning (one more row is the null token).
    """

    def __init__(self, kind: str, dim: int, num_classes: int) -> None:
        super().__init__()
        if kind not in CONDITIONS:
            raise ModelError(f"unknown condition {kind!r}", f"valid: {', '.join(CONDITIONS)}")
        self.kind, self.dim, self.num_classes = kind, dim, num_classes
        self.class_embed = nn.Embedding(num_classes + 1, dim) if kind == "class" else None
        self.text = TextEncoder(dim) if kind == "text" else None

    def forward(self, cond: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """`(context (B, S, D), key padding mask (B, S) or None)`; `(None, None)` for `none`."""
        if self.kind == "none" or cond is None:
            return None, None
        if self.class_embed is not None:
            return self.class_embed(cond)[:, None, :], None  # (B, 1, D)
        assert self.text is not None
        return self.text(cond)

    def null_condition(self, cond: Tensor) -> Tensor:
        """The "no condition" input shaped like `cond`."""
        fill = self.num_classes if self.kind == "class" else PAD_ID
        return torch.full_like(cond, fill)

    def drop(self, cond: Tensor, keep: Tensor) -> Tensor:
        """`cond` where `keep` `(B,)` is True, the null condition elsewhere (CFG training)."""
        keep = keep.view(-1, *([1] * (cond.dim() - 1)))
        return torch.where(keep, cond, self.null_condition(cond))

    def from_labels(self, labels: Tensor, caption_len: int = 16) -> Tensor | None:
        """The condition for class `labels` `(B,)`: the labels, or their captions' bytes."""
        if self.kind == "class":
            return labels
        if self.kind == "text":
            texts = [class_caption(int(y)) for y in labels.tolist()]
            return encode_captions(texts, caption_len).to(labels.device)
        return None
