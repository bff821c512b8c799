"""BERT: a Transformer encoder pretrained by masked-token prediction (SEEDS A15, A16).

The encoder is the Transformer's (S3:2114, 2522): bidirectional self-attention, so every
position sees the whole sequence; "self-attention + add & norm + FFN + add & norm", i.e.
post-LN by default (S3:2079, 2104-2112), with learned absolute positions as in BERT. The output
at each position goes through the MLM head (`Linear -> GELU -> LayerNorm -> Linear` to the
vocabulary, the last map tied to the token embedding) and softmax/CE against the original token
at the selected positions (S3:2526-2531).

The corruption (which tokens are selected; `[MASK]` or a random token) is done by the
`masked_lm` task, not the model, so the model stays a plain `(B, T) -> (B, T, V)` encoder that
can also be fine-tuned; see `roundhouse.trainer.tasks_lm.Masking`.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from roundhouse.models.common import check_dropout
from roundhouse.models.gpt import (
    MLP,
    TokenEmbedding,
    TransformerBlock,
    build_activation,
    check_choices,
    check_positions,
    flavor_flops,
    init_transformer,
    sequence_length,
)
from roundhouse.models.registry import BuildConfig, ModelSpec, register
from roundhouse.models.spec import BYTE_VOCAB, TOKEN_INPUT

logger = logging.getLogger(__name__)


class MLMHead(nn.Module):
    """BERT's prediction head: `Linear(C, C) -> GELU -> LayerNorm -> Linear(C, V)`."""

    def __init__(
        self, dim: int, vocab_size: int, activation: str = "gelu", norm_eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.transform = nn.Sequential(
            nn.Linear(dim, dim), build_activation(activation), nn.LayerNorm(dim, eps=norm_eps)
        )
        self.proj = nn.Linear(dim, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        """Token logits `(B, T, V)` from encoder states `(B, T, C)`."""
        return self.proj(self.transform(x))  # (B, T, V)


class BERT(nn.Module):
    """`embed -> encoder blocks -> MLM head`: `(B, T)` ids to `(B, T, V)` logits.

    `encode` returns the encoder's `(B, T, C)` outputs (position 0 is the `[CLS]` slot for a
    fine-tuning classifier).
    """

    # A Hugging Face BertModel/BertFor*Classification folder's heads (see `models.text_heads`).
    ignored_weights = ("pooler.", "classifier.")

    def __init__(
        self, embed: TokenEmbedding, blocks: list[nn.Module], norm: nn.Module, head: MLMHead
    ) -> None:
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head

    def encode(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Contextual embeddings `(B, T, C)` of `tokens` `(B, T)` (padding masked out)."""
        x = self.embed(tokens)  # (B, T, C)
        for block in self.blocks:
            x = block(x, key_padding_mask=key_padding_mask)
        return self.norm(x)

    def forward(self, tokens: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Token logits `(B, T, V)` of `tokens` `(B, T)`, padding positions masked out."""
        return self.head(self.encode(tokens, key_padding_mask))  # (B, T, V)


def build_bert(
    input_shape: tuple[int, ...],
    num_classes: int,
    dim: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    mlp_ratio: int = 4,
    positions: str = "learned",
    norm: str = "post",
    dropout: float = 0.0,
    tie_weights: bool = True,
    max_len: int | None = None,
    activation: str = "gelu",
    norm_eps: float = 1e-5,
    embed_norm: bool = False,
) -> BERT:
    """Builds a BERT encoder for `(T,)` token inputs and a vocabulary of `num_classes`.

    Args: as `build_gpt`; `positions` defaults to `"learned"` and `norm` to `"post"` (BERT's).
    `embed_norm` adds a LayerNorm after the embeddings (Hugging Face BERT checkpoints have
    one; `init_from` turns it on for them).
    """
    seq_len = sequence_length("bert", input_shape)
    check_choices("bert", positions, norm)
    check_positions("bert", seq_len, max_len, positions)
    dropout = check_dropout(dropout)
    build_activation(activation)
    learned = positions == "learned"
    embed_eps = norm_eps if embed_norm else None
    embed = TokenEmbedding(num_classes, dim, max_len or seq_len, learned, dropout, embed_eps)
    blocks = [
        TransformerBlock(
            dim,
            num_heads,
            MLP(dim, mlp_ratio * dim, dropout, activation=activation),
            norm=norm,
            causal=False,
            rope=positions == "rope",
            dropout=dropout,
            norm_eps=norm_eps,
        )
        for _ in range(num_layers)
    ]
    # Post-LN blocks end in a LayerNorm; pre-LN ones need one before the head.
    final = nn.LayerNorm(dim, eps=norm_eps) if norm == "pre" else nn.Identity()
    model = BERT(embed, blocks, final, MLMHead(dim, num_classes, activation, norm_eps))
    init_transformer(model, num_layers)
    if tie_weights:
        model.head.proj.weight = model.embed.tok.weight
    return model


def bert_flops(config: BuildConfig) -> int:
    """Forward FLOPs per sequence (the MLM head's `C x C` transform is ignored)."""
    return flavor_flops(SPEC, config)


def bert_layers(model: nn.Module) -> list[nn.Module]:
    """`[embed, *blocks, norm, head]` (no padding mask in a pipeline)."""
    assert isinstance(model, BERT)
    return [model.embed, *model.blocks, model.norm, model.head]


SPEC = register(
    ModelSpec(
        name="bert",
        flavors={
            "debug": {"dim": 64, "num_layers": 2, "num_heads": 4},
            "small": {"dim": 384, "num_layers": 6, "num_heads": 6},
            "base": {"dim": 768, "num_layers": 12, "num_heads": 12},
        },
        builder=build_bert,
        description="Transformer encoder pretrained as a masked LM ([MASK]/random replacement)",
        loss="masked_lm",
        pipeline_layers=bert_layers,
        flops_per_sample=bert_flops,
        example_input=TOKEN_INPUT,
        example_classes=BYTE_VOCAB,
    )
)
