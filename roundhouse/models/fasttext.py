"""fastText: a bag of hashed n-grams with a linear classifier (Joulin et al., 2016).

The input is byte tokens `(B, T)` (PAD_ID where a text is shorter). Every window of `n`
tokens (`n = 1..ngrams`) without padding is one feature; its id is a polynomial hash of the
`n` tokens taken modulo `buckets`, so `0 <= id < buckets` holds by construction for any token
values (tested). Windows touching padding map to the extra row `buckets`, the `EmbeddingBag`'s
`padding_idx`, which the mean leaves out and which never gets a gradient. The text's vector is
the mean of its feature embeddings; a linear head maps it to logits `(B, num_classes)`.

With `sparse=True` (the default) the table's gradient is a sparse tensor holding only the rows
a batch touched: the parameter server pushes and pulls just those rows
(`roundhouse.parallel.ps`), the ring densifies them or all-gathers them, and optimizers must
take sparse gradients (sgd, adagrad, lazy_adam). At 2^21 buckets a batch of 64 docstrings
touches well under 1% of the rows.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.common import is_tracing
from roundhouse.models.registry import ModelSpec, register
from roundhouse.models.spec import TOKEN_INPUT

logger = logging.getLogger(__name__)

HASH_MODULUS = 2_147_483_647  # 2^31 - 1: (h * HASH_MULTIPLIER + token) stays within int64
HASH_MULTIPLIER = 1_000_003
PAD_TOKEN = 256  # roundhouse.data.text.PAD_ID (models/ does not import data/)
DEFAULT_BUCKETS = 2**21


def hash_ngrams(tokens: Tensor, ngrams: int, buckets: int, pad: int = PAD_TOKEN) -> Tensor:
    """Feature ids `(B, F)` of every 1..`ngrams`-gram of `tokens` `(B, T)`.

    A window with a `pad` token gets id `buckets` (the padding row); every other id is in
    `[0, buckets)`: the hash is reduced modulo `HASH_MODULUS`, then modulo `buckets`, and both
    moduli are positive. `F = sum(T - n + 1 for n in 1..ngrams)` (windows longer than `T` give
    none).
    """
    tokens = tokens.long()
    length = tokens.shape[1]
    valid_token = tokens != pad
    parts = []
    for n in range(1, ngrams + 1):
        count = length - n + 1
        if count <= 0:
            break
        h = torch.full_like(tokens[:, :count], n)
        valid = torch.ones_like(valid_token[:, :count])
        for k in range(n):
            # remainder() is non-negative for a positive modulus, whatever the token's sign.
            h = torch.remainder(h * HASH_MULTIPLIER + tokens[:, k : k + count], HASH_MODULUS)
            valid = valid & valid_token[:, k : k + count]
        ids = torch.remainder(h, buckets)
        parts.append(torch.where(valid, ids, torch.full_like(ids, buckets)))
    return torch.cat(parts, dim=1)  # (B, F)


class FastText(nn.Module):
    """Mean of hashed n-gram embeddings, then a linear head; `(B, T)` tokens -> `(B, classes)`."""

    def __init__(self, num_classes: int, buckets: int, ngrams: int, dim: int, sparse: bool) -> None:
        super().__init__()
        self.buckets, self.ngrams = buckets, ngrams
        # One extra row: the padding feature, left out of the mean and of every gradient.
        self.embed = nn.EmbeddingBag(
            buckets + 1, dim, mode="mean", padding_idx=buckets, sparse=sparse
        )
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():  # fastText's init: small uniform input vectors
            self.embed.weight.uniform_(-1.0 / dim, 1.0 / dim)
            self.embed.weight[buckets].zero_()

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits `(B, num_classes)` of byte tokens `(B, T)`."""
        features = hash_ngrams(tokens, self.ngrams, self.buckets)  # (B, F)
        if is_tracing():
            return self.head(self.gathered_mean(features))
        return self.head(self.embed(features))  # (B, dim) -> (B, num_classes)

    def gathered_mean(self, features: Tensor) -> Tensor:
        """The bag's mean as a gather and a masked sum `(B, dim)`: the same numbers, in ops
        that ONNX has (its exporter takes no `EmbeddingBag` with a `padding_idx`)."""
        rows = nn.functional.embedding(features, self.embed.weight)  # (B, F, dim)
        keep = (features != self.buckets).unsqueeze(-1).to(rows.dtype)
        return (rows * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def build_fasttext(
    input_shape: tuple[int, ...],
    num_classes: int,
    buckets: int = DEFAULT_BUCKETS,
    ngrams: int = 2,
    dim: int = 16,
    sparse: bool = True,
) -> FastText:
    """A fastText classifier for `(T,)` token inputs.

    Args:
        input_shape: `(T,)`: token sequences.
        num_classes: Logits out.
        buckets: Rows of the hashed feature table (plus one padding row).
        ngrams: Longest n-gram hashed (1: bytes only; 2: bytes and byte pairs).
        dim: Embedding width.
        sparse: Sparse gradients for the table (only the rows a batch touched).

    Raises:
        ModelError: A non-token input shape or a non-positive size.
    """
    if len(input_shape) != 1:
        raise ModelError(
            f"fasttext takes (T,) token inputs, got shape {input_shape}",
            "use a text source such as builtin:pydoc-cls",
        )
    for name, value in (("buckets", buckets), ("ngrams", ngrams), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(
                f"fasttext option {name} must be a positive integer, got {value!r}",
                f"set model.options.{name} to e.g. {build_fasttext.__defaults__[0]}"
                if name == "buckets"
                else f"set model.options.{name} to a positive integer",
            )
    return FastText(num_classes, buckets, ngrams, dim, bool(sparse))


SPEC = register(
    ModelSpec(
        name="fasttext",
        flavors={
            "debug": {"buckets": 4096, "dim": 8},
            "base": {"buckets": DEFAULT_BUCKETS, "dim": 16},
            "wide": {"buckets": DEFAULT_BUCKETS, "dim": 64, "ngrams": 3},
        },
        builder=build_fasttext,
        description="fastText: hashed byte n-gram EmbeddingBag + linear head (sparse gradients)",
        example_input=TOKEN_INPUT,
    )
)
