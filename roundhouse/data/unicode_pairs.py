"""`builtin:unicode-pairs`: a character's Unicode name -> the names of its decomposition.

Python ships the Unicode Character Database (`unicodedata`), written and maintained by people.
Every character with a decomposition makes a pair: its name (`LATIN SMALL LETTER E WITH ACUTE`)
and the names of the characters it decomposes to, after the compatibility tag if any
(`LATIN SMALL LETTER E + COMBINING ACUTE ACCENT`; `MATHEMATICAL BOLD SMALL T` -> `<font> LATIN
SMALL LETTER T`; `CIRCLED DIGIT ONE` -> `<circle> DIGIT ONE`). A model has to learn the naming
conventions (`X WITH Y` -> `X + COMBINING Y`, which word names which tag) and to copy the right
letters and words: a nearest neighbour by word overlap finds a sibling (`... E WITH GRAVE`) and
returns its target, right in structure and wrong in a word.

Skipped: Hangul syllables and CJK compatibility ideographs, whose names are their code points
(an algorithm, not a convention), and characters whose parts have no name. On Python 3.11
(Unicode 14) that leaves 4,793 pairs, split by a SHA-256 of the source name into 3,837 / 482 /
474 train/val/test pairs (80/10/10, the same on every run and rank).
"""

from __future__ import annotations

import functools
import hashlib
import sys
import unicodedata

SKIPPED_PREFIXES = ("HANGUL SYLLABLE", "CJK COMPATIBILITY IDEOGRAPH")


def _pair(char: str) -> tuple[str, str] | None:
    """`(name, decomposition names)` of `char`, or None when it has none to learn."""
    parts = unicodedata.decomposition(char).split()
    name = unicodedata.name(char, "")
    if not parts or not name or name.startswith(SKIPPED_PREFIXES):
        return None
    tag = parts[0] + " " if parts[0].startswith("<") else ""
    names = [unicodedata.name(chr(int(p, 16)), "") for p in parts if not p.startswith("<")]
    return (name, tag + " + ".join(names)) if all(names) else None


def _split(name: str) -> int:
    value = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return 0 if value < 0.8 else 1 if value < 0.9 else 2


@functools.lru_cache(maxsize=1)
def unicode_pairs() -> tuple[tuple[tuple[str, str], ...], ...]:
    """The pairs of train, val and test, in code point order within each split."""
    parts: list[list[tuple[str, str]]] = [[], [], []]
    for code in range(sys.maxunicode + 1):
        pair = _pair(chr(code))
        if pair is not None:
            parts[_split(pair[0])].append(pair)
    return tuple(tuple(part) for part in parts)


__all__ = ["unicode_pairs"]
