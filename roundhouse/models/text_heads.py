"""Fine-tuning heads on the Transformer encoders: text and token classification (SEEDS S3:2545).

BERT is pretrained as a masked LM and then fine-tuned downstream with a small new head:

- `bert_classifier`: the `[CLS]` slot (position 0) through BERT's pooler (`Linear(C, C) ->
  tanh`), dropout and `Linear(C, K)`: `(B, T)` ids -> `(B, K)` logits, as Hugging Face's
  `BertForSequenceClassification`.
- `bert_tagger`: every position through dropout and `Linear(C, K)`: `(B, T)` -> `(B, T, K)`,
  as `BertForTokenClassification`.
- `gpt_classifier`: a causal GPT whose last non-padding position (the only one that has seen
  the whole text) goes through `score`, a bias-free `Linear(C, K)` (as
  `GPT2ForSequenceClassification`).

The backbone modules keep the pretraining model's names (`embed`, `blocks`, `norm` / `head.norm`)
so `model.init_from` a roundhouse MLM/LM run or a Hugging Face BERT folder loads them as they
are. Two class attributes tell `init_from` about the rest, so no `init_skip` is needed:
`ignored_weights` (source prefixes the model has no use for: the MLM head, the LM output map) and
`new_heads` (model prefixes that are loaded when the source has them, e.g. a Hugging Face
`BertForSequenceClassification` folder, and stay freshly initialised otherwise).

Padding (`PAD_ID`, the byte tokenizer's) is masked out of attention. `num_classes` is the number
of labels; `vocab_size` the token vocabulary (the data's `DataInfo.vocab_size`, or the
Hugging Face folder's).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from roundhouse.data.text import PAD_ID, VOCAB_SIZE
from roundhouse.errors import ModelError
from roundhouse.models.bert import build_bert
from roundhouse.models.common import check_dropout
from roundhouse.models.gpt import build_gpt, flavor_flops
from roundhouse.models.registry import BuildConfig, ModelSpec, register
from roundhouse.models.spec import TOKEN_INPUT

INIT_STD = 0.02  # BERT's and GPT-2's initializer_range


def _linear(dim_in: int, dim_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(dim_in, dim_out, bias=bias)
    nn.init.normal_(layer.weight, std=INIT_STD)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


POOLINGS = ("cls", "mean")


class Pooler(nn.Module):
    """BERT's pooler: the first position's state (`pooling: cls`, Hugging Face's) or the mean
    of the non-padding states (`pooling: mean`) through `Linear(C, C) -> tanh`."""

    def __init__(self, dim: int, pooling: str = "cls") -> None:
        super().__init__()
        self.dense = _linear(dim, dim)
        self.pooling = pooling

    def forward(self, states: Tensor, padding: Tensor) -> Tensor:
        """`(B, C)` pooled vectors from encoder states `(B, T, C)` and padding `(B, T)`."""
        if self.pooling == "cls":
            return torch.tanh(self.dense(states[:, 0]))
        keep = (~padding).unsqueeze(-1).to(states.dtype)  # (B, T, 1)
        mean = (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)  # (B, C)
        return torch.tanh(self.dense(mean))


class _Encoder(nn.Module):
    """BERT's `embed -> blocks -> norm`, the names of the `bert` model (so its runs load)."""

    pad_id = PAD_ID

    def encode(self, tokens: Tensor) -> Tensor:
        """Contextual states `(B, T, C)` of `tokens` `(B, T)`, padding masked out of attention."""
        padding = tokens == self.pad_id  # (B, T); no data-dependent branch (meta, tracing)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, key_padding_mask=padding)
        return self.norm(x)


class BertClassifier(_Encoder):
    """`(B, T)` ids -> `(B, K)` logits from the pooled `[CLS]` slot."""

    ignored_weights = ("head.",)  # the MLM head of a pretraining run / BertForMaskedLM
    new_heads = ("pooler.", "classifier.")

    def __init__(
        self, bert: nn.Module, num_labels: int, dropout: float, pooling: str = "cls"
    ) -> None:
        super().__init__()
        self.embed, self.blocks, self.norm = bert.embed, bert.blocks, bert.norm
        dim = bert.embed.tok.embedding_dim
        self.pooler = Pooler(dim, pooling)
        self.drop = nn.Dropout(dropout)
        self.classifier = _linear(dim, num_labels)

    def forward(self, tokens: Tensor) -> Tensor:
        """Label logits `(B, K)`."""
        pooled = self.pooler(self.encode(tokens), tokens == self.pad_id)
        return self.classifier(self.drop(pooled))


class BertTagger(_Encoder):
    """`(B, T)` ids -> `(B, T, K)` per-token label logits."""

    ignored_weights = ("head.", "pooler.")
    new_heads = ("classifier.",)

    def __init__(self, bert: nn.Module, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.embed, self.blocks, self.norm = bert.embed, bert.blocks, bert.norm
        self.drop = nn.Dropout(dropout)
        self.classifier = _linear(bert.embed.tok.embedding_dim, num_labels)

    def forward(self, tokens: Tensor) -> Tensor:
        """Label logits `(B, T, K)`."""
        return self.classifier(self.drop(self.encode(tokens)))


class _FinalNorm(nn.Module):
    """GPT's final LayerNorm, kept at the LM's name `head.norm` so an LM run loads into it."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm


class GPTClassifier(nn.Module):
    """A causal GPT; the last non-padding position's state -> `(B, K)` logits via `score`."""

    ignored_weights = ("head.proj.",)  # the LM's output map
    new_heads = ("score.",)
    pad_id = PAD_ID

    def __init__(self, gpt: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.embed, self.blocks = gpt.embed, gpt.blocks
        self.head = _FinalNorm(gpt.head.norm)
        self.score = _linear(gpt.embed.tok.embedding_dim, num_labels, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Label logits `(B, K)` at each sequence's last non-padding token."""
        x = self.embed(tokens)
        for block in self.blocks:  # causal: padding after the text never reaches it
            x = block(x)
        states = self.head.norm(x)  # (B, T, C)
        lengths = (tokens != self.pad_id).sum(dim=1).clamp(min=1)  # right padding
        last = states[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.score(last)


def _dropout(classifier_dropout: float | None, options: dict[str, Any]) -> float:
    return check_dropout(
        options.get("dropout", 0.0) if classifier_dropout is None else classifier_dropout
    )


def build_bert_classifier(
    input_shape: tuple[int, ...],
    num_classes: int,
    vocab_size: int = VOCAB_SIZE,
    classifier_dropout: float | None = None,
    pooling: str = "cls",
    **options: Any,
) -> BertClassifier:
    """A BERT encoder (`build_bert`'s `options`) with a `[CLS]` classifier of `num_classes`.

    `classifier_dropout` defaults to the encoder's `dropout`. `pooling: mean` pools the mean
    of the non-padding states instead of position 0 (a masked-LM run never trains its first
    slot as a summary; Hugging Face's `BertForSequenceClassification` pools `cls`).

    Raises:
        ModelError: An unknown `pooling`.
    """
    if pooling not in POOLINGS:
        raise ModelError(
            f"model.options.pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}",
            "set model.options.pooling to cls or mean",
        )
    bert = build_bert(input_shape, vocab_size, **options)
    return BertClassifier(bert, num_classes, _dropout(classifier_dropout, options), pooling)


def build_bert_tagger(
    input_shape: tuple[int, ...],
    num_classes: int,
    vocab_size: int = VOCAB_SIZE,
    classifier_dropout: float | None = None,
    **options: Any,
) -> BertTagger:
    """A BERT encoder with a per-token classifier of `num_classes` labels."""
    bert = build_bert(input_shape, vocab_size, **options)
    return BertTagger(bert, num_classes, _dropout(classifier_dropout, options))


def build_gpt_classifier(
    input_shape: tuple[int, ...], num_classes: int, vocab_size: int = VOCAB_SIZE, **options: Any
) -> GPTClassifier:
    """A GPT (`build_gpt`'s `options`) classifying from its last non-padding token."""
    return GPTClassifier(build_gpt(input_shape, vocab_size, **options), num_classes)


def _flops(name: str, base: str) -> Any:
    def flops_per_sample(config: BuildConfig) -> int:
        vocab = int(config.options.get("vocab_size", VOCAB_SIZE))
        from roundhouse.models.registry import get

        spec = get(base)
        base_config = BuildConfig(config.flavor, config.input_shape, vocab, config.options)
        return flavor_flops(spec, base_config)

    flops_per_sample.__name__ = f"{name}_flops"
    return flops_per_sample


BERT_FLAVORS = {
    "debug": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "small": {"dim": 384, "num_layers": 6, "num_heads": 6},
    "base": {"dim": 768, "num_layers": 12, "num_heads": 12},
}
GPT_FLAVORS = {
    "debug": {"dim": 64, "num_layers": 2, "num_heads": 4},
    "tiny": {"dim": 128, "num_layers": 4, "num_heads": 4},
    "small": {"dim": 384, "num_layers": 6, "num_heads": 6},
}

for _name, _builder, _flavors, _task, _base, _text in (
    ("bert_classifier", build_bert_classifier, BERT_FLAVORS, "text_classification", "bert",
     "BERT + [CLS] pooler classifier (fine-tune a bert MLM run or a Hugging Face BERT)"),
    ("bert_tagger", build_bert_tagger, BERT_FLAVORS, "token_classification", "bert",
     "BERT + per-token classifier (token labelling)"),
    ("gpt_classifier", build_gpt_classifier, GPT_FLAVORS, "text_classification", "gpt",
     "GPT + last-token classifier (fine-tune a gpt LM run)"),
):  # fmt: skip
    register(
        ModelSpec(
            name=_name,
            flavors=_flavors,
            builder=_builder,
            description=_text,
            loss=_task,
            flops_per_sample=_flops(_name, _base),
            example_input=TOKEN_INPUT,
        )
    )
