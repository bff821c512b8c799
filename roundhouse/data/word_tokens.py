"""A word-piece tokenizer with byte fallback, built from a training split only.

The byte tokenizer of `roundhouse.data.text` makes a docstring summary some 60 tokens long; a
small model on a CPU does not learn to spell that in minutes. `WordPieces` keeps the byte
tokenizer's ids and adds whole pieces on top:

- ids 0-255 are the bytes and 256-259 the specials (`PAD`, `BOS`, `EOS`, `MASK`), exactly as
  the byte tokenizer's, so a model, a task or an exported graph that knows the specials works
  with either tokenizer unchanged;
- ids 260 and up are the most frequent pieces of the training texts. A piece is a run of
  letters (camelCase split at its humps), a run of digits, or one other character, with the
  single space before it, if any (` Return`, ` the`, `_`, `name`, `(`). Any piece outside the
  vocabulary is spelled as its UTF-8 bytes, so every text round-trips exactly and nothing is
  ever unknown.

The vocabulary is a pure function of the training texts and the two options (`min_count`,
`max_pieces`): every process that builds it from the same split gets the same ids, and its
`fingerprint` names it (what a checkpoint and the data must agree on besides the size).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .text import NUM_BYTES, VOCAB_SIZE

# A space (optional) + letters (camelCase split) | digits | one other char; or bare whitespace.
PIECE = re.compile(r" ?[A-Z]?[a-z]+| ?[A-Z]+(?![a-z])| ?\d+| ?[^\sA-Za-z\d]|\s")
FIRST_PIECE_ID = VOCAB_SIZE  # after the bytes and the byte tokenizer's four specials


def split_pieces(text: str) -> list[str]:
    """`text` cut into pieces whose concatenation is `text` exactly.

    `"Return getAll(x)."` -> `["Return", " get", "All", "(", "x", ")", "."]`.
    """
    return PIECE.findall(text)


@dataclass(frozen=True)
class WordPieces:
    """The tokenizer: byte ids, the specials, then `pieces` from id 260 on.

    Attributes:
        pieces: The learned pieces in id order.
    """

    pieces: tuple[str, ...]
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = {piece: FIRST_PIECE_ID + i for i, piece in enumerate(self.pieces)}
        object.__setattr__(self, "_ids", ids)

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 2, max_pieces: int = 8000) -> WordPieces:
        """The pieces seen at least `min_count` times in `texts` (most frequent first, ties by
        text), at most `max_pieces`; single bytes are never learned (they have ids already)."""
        counts = Counter(p for text in texts for p in split_pieces(text))
        kept = [p for p, n in counts.items() if n >= min_count and len(p.encode("utf-8")) > 1]
        kept.sort(key=lambda p: (-counts[p], p))
        return cls(tuple(kept[:max_pieces]))

    @property
    def vocab_size(self) -> int:
        """Bytes, specials and pieces: what a model's embedding is built for."""
        return FIRST_PIECE_ID + len(self.pieces)

    @property
    def fingerprint(self) -> str:
        """A short SHA-256 of the pieces: equal fingerprints mean equal ids."""
        return hashlib.sha256("\n".join(self.pieces).encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Ids of `text`: a known piece is one id, any other piece its UTF-8 bytes."""
        out: list[int] = []
        for piece in split_pieces(text):
            known = self._ids.get(piece)
            out.extend([known] if known is not None else piece.encode("utf-8"))
        return out

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of `ids`; specials and unknown ids are dropped, bad UTF-8 replaced."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        data = bytearray()
        for i in values:
            if 0 <= i < NUM_BYTES:
                data.append(i)
            elif FIRST_PIECE_ID <= i < self.vocab_size:
                data.extend(self.pieces[i - FIRST_PIECE_ID].encode("utf-8"))
        return data.decode("utf-8", errors="replace")


__all__ = ["FIRST_PIECE_ID", "WordPieces", "split_pieces"]
