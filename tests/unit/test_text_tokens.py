"""`tokenizer: words` on the stdlib text sources (one shared vocabulary) and the mean-pooling
BERT classifier the transfer benchmark fine-tunes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from roundhouse.config import DataConfig
from roundhouse.config.loading import validate_job
from roundhouse.data.sources import build_source_splits
from roundhouse.data.text import PAD_ID, VOCAB_SIZE
from roundhouse.data.text_tokens import stdlib_word_pieces
from roundhouse.data.word_tokens import FIRST_PIECE_ID
from roundhouse.errors import DataError, ModelError
from roundhouse.weights.model_build import build_model_for

WORD_SOURCES = {
    "builtin:pytext": {"seq_len": 32, "max_bytes": 200_000},
    "builtin:pydoc-text": {"seq_len": 32},
    "builtin:pydoc-cls": {"seq_len": 32},
}


def splits_of(source: str, **options: Any) -> Any:
    return build_source_splits(DataConfig(source=source, options=options), seed=0)


def test_the_text_sources_share_one_word_vocabulary() -> None:
    pieces = stdlib_word_pieces()
    assert pieces.vocab_size > 1000 and " the" in pieces.pieces
    for source, options in WORD_SOURCES.items():
        words = splits_of(source, **options, tokenizer="words")
        nbytes = splits_of(source, **options)
        assert words.info.vocab_size == pieces.vocab_size, source
        assert nbytes.info.vocab_size == VOCAB_SIZE, source
        ids = words.train[list(range(8))]["input"]
        assert int(ids.max()) >= FIRST_PIECE_ID and int(ids.max()) < pieces.vocab_size
        assert int(nbytes.train[list(range(8))]["input"].max()) < VOCAB_SIZE


def test_words_make_a_docstring_shorter_and_keep_the_labels() -> None:
    words = splits_of("builtin:pydoc-cls", seq_len=256, tokenizer="words")
    nbytes = splits_of("builtin:pydoc-cls", seq_len=256)
    w, b = words.test[list(range(32))], nbytes.test[list(range(32))]
    assert torch.equal(w["target"], b["target"])
    assert (w["input"] != PAD_ID).sum() * 2 < (b["input"] != PAD_ID).sum()


def test_bad_tokenizer_options_are_one_error() -> None:
    with pytest.raises(DataError, match="tokenizer of builtin:pytext must be one of"):
        splits_of("builtin:pytext", tokenizer="bpe", max_bytes=200_000)
    with pytest.raises(DataError, match="min_count of builtin:pydoc-cls needs tokenizer: words"):
        splits_of("builtin:pydoc-cls", min_count=3)


def classifier(pooling: str) -> torch.nn.Module:
    model = {"name": "bert_classifier", "flavor": "debug", "options": {"pooling": pooling}}
    job = validate_job({"name": "cls", "model": model})
    return build_model_for(job, (16,), 3, vocab_size=VOCAB_SIZE).eval()


def test_mean_pooling_ignores_padding_and_differs_from_cls() -> None:
    torch.manual_seed(0)
    mean = classifier("mean")
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    padded = tokens.clone()
    padded[:, 10:] = PAD_ID
    with torch.no_grad():
        torch.testing.assert_close(mean(padded), mean(tokens[:, :10]))
        cls = classifier("cls")
        cls.load_state_dict(mean.state_dict())
        assert not torch.allclose(cls(tokens), mean(tokens))
    with pytest.raises(ModelError, match="pooling must be one of cls, mean"):
        classifier("max")
