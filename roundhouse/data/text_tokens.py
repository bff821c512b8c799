"""`tokenizer: words` for the stdlib text sources: one shared word-piece vocabulary.

`builtin:pytext`, `builtin:pydoc-text` and `builtin:pydoc-cls` are bytes by default. With
`data.options.tokenizer: words` they all use the same `WordPieces` (`roundhouse.data.word_tokens`):
the pieces of the **training** docstrings of the fixed hash split of `pydoc_corpus` (seen
`min_count`+ times, default 2; at most 8,000). The vocabulary depends on neither the run seed nor
any source's own options, so a model pretrained on `pytext` with words and fine-tuned on
`pydoc-cls` with words sees the same ids for the same text (`init_from` checks the sizes agree).
No label and no val/test docstring goes into it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from roundhouse.errors import DataError

from .pydoc_corpus import TOKENIZERS, split_of, stdlib_docstrings
from .text import VOCAB_SIZE, positive_int_option
from .word_tokens import WordPieces

TOKENIZER_OPTIONS = ("tokenizer", "min_count")


@functools.lru_cache(maxsize=4)
def stdlib_word_pieces(min_count: int = 2) -> WordPieces:
    """The word pieces of the training docstrings (split 0 of the fixed hash split)."""
    texts = [r.docstring for r in stdlib_docstrings() if split_of(r.key) == 0]
    return WordPieces.build(texts, min_count=min_count)


def split_tokenizer_options(
    options: dict[str, Any], source: str
) -> tuple[dict[str, Any], Callable[[str | bytes], list[int]] | None, int]:
    """`(the other options, text -> ids or None for bytes, vocabulary size)` for a stdlib text
    source.

    Raises:
        DataError: An unknown tokenizer, a bad `min_count`, or `min_count` without words.
    """
    rest = {k: v for k, v in options.items() if k not in TOKENIZER_OPTIONS}
    name = options.get("tokenizer", "bytes")
    if name not in TOKENIZERS:
        raise DataError(
            f"data.options.tokenizer of {source} must be one of {', '.join(TOKENIZERS)}, "
            f"got {name!r}",
            "use tokenizer: words (word pieces of the training docstrings) or bytes",
        )
    if name == "bytes":
        if "min_count" in options:
            raise DataError(
                f"data.options.min_count of {source} needs tokenizer: words",
                "set data.options.tokenizer: words or drop min_count",
            )
        return rest, None, VOCAB_SIZE
    pieces = stdlib_word_pieces(positive_int_option(options, "min_count", 2))

    def encode_words(text: str | bytes) -> list[int]:
        return pieces.encode(text if isinstance(text, str) else text.decode("utf-8", "replace"))

    return rest, encode_words, pieces.vocab_size


__all__ = ["TOKENIZER_OPTIONS", "split_tokenizer_options", "stdlib_word_pieces"]
