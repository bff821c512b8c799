"""Text for language models: tokenize documents, pack them into rows of `seq_len + 1` tokens.

Packing follows `roundhouse.data.text.pack_documents` (the in-memory `builtin:pytext`): the
documents of a split are concatenated with an `EOS` token after each and cut into rows of
`seq_len + 1` token ids (int32, the `input` column); a row gives `input = row[:-1]` and
`target = row[1:]`. The final partial row of a split is dropped.

Document boundaries stay visible: `EOS` is a token no document contains (the byte
tokenizer's id 258; a Hugging Face tokenizer's end-of-text token, with text encoded without
special tokens), so `segment_ids` recovers which document each position belongs to and
`block_causal_mask` the block-diagonal causal mask a model needs to keep documents apart. The
index records the tokenizer, `eos_id`, `vocab_size` and `seq_len` under `extra`. The built-in
`language_model` and `masked_lm` tasks ignore the boundaries: like GPT-2, they attend across
`EOS` within a row, as the in-memory `builtin:pytext` does.

Tokenizers: `bytes` (built in, vocabulary 260) or a Hugging Face tokenizer (a `tokenizer.json`
file or a hub name) when `tokenizers` or `transformers` is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from roundhouse.errors import DataError

from ..sampler import SPLIT_STREAM, derive_seed
from ..text import EOS_ID, VOCAB_SIZE, encode, load_pytext_splits
from .index import InputSchema
from .writer import Chunk

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
_CHUNK_ROWS = 4096
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>")


@dataclass(frozen=True)
class Tokenizer:
    """What packing needs from a tokenizer: ids of a text, the separator and the vocabulary."""

    name: str
    encode: Callable[[str], list[int]]
    eos_id: int
    vocab_size: int


def byte_tokenizer() -> Tokenizer:
    """The built-in byte-level tokenizer of `roundhouse.data.text`."""

    return Tokenizer("bytes", encode, EOS_ID, VOCAB_SIZE)


def _from_tokenizers(name: str) -> Tokenizer | None:
    """With the `tokenizers` package: a `tokenizer.json` file or a hub name; None without it."""
    try:
        from tokenizers import Tokenizer as HubTokenizer
    except ImportError:
        return None
    is_file = Path(name).is_file()
    tok = HubTokenizer.from_file(name) if is_file else HubTokenizer.from_pretrained(name)
    ids = [tok.token_to_id(token) for token in _EOS_NAMES]
    eos = next((i for i in ids if i is not None), None)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return _with_eos(name, encode, eos, tok.get_vocab_size(with_added_tokens=True))


def _hf_tokenizer(name: str) -> Tokenizer:
    found = _from_tokenizers(name)
    if found is not None:
        return found
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise DataError(
            f"--tokenizer {name} needs the Hugging Face `tokenizers` (or `transformers`) package",
            "pip install tokenizers, or use --tokenizer bytes",
        ) from err
    auto = AutoTokenizer.from_pretrained(name)
    eos = auto.eos_token_id if auto.eos_token_id is not None else auto.sep_token_id
    return _with_eos(name, lambda text: auto.encode(text, add_special_tokens=False), eos, len(auto))


def _with_eos(
    name: str, encode: Callable[[str], list[int]], eos: int | None, vocab: int
) -> Tokenizer:
    # A tokenizer without an end-of-text token gets one more id as the separator.
    if eos is None:
        return Tokenizer(name, encode, vocab, vocab + 1)
    return Tokenizer(name, encode, int(eos), vocab)


def build_tokenizer(name: str) -> Tokenizer:
    """`bytes` or a Hugging Face tokenizer (a `tokenizer.json` path or a hub name).

    Raises:
        DataError: When neither `tokenizers` nor `transformers` is installed, or the tokenizer
            cannot be loaded.
    """
    if name == "bytes":
        return byte_tokenizer()
    try:
        return _hf_tokenizer(name)
    except DataError:
        raise
    except Exception as err:  # the libraries raise many kinds (OSError, ValueError, hub errors)
        raise DataError(
            f"cannot load tokenizer {name!r}: {err}", "pass a tokenizer.json path or a hub name"
        ) from err


def pack_rows(docs: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Documents, each followed by `eos_id`, concatenated and cut into `(N, seq_len + 1)` rows."""
    pieces = [np.asarray(doc, dtype=np.int64) for doc in docs]
    stream = np.concatenate([p for doc in pieces for p in (doc, np.array([eos_id]))] or [[]])
    rows = len(stream) // (seq_len + 1)
    return stream[: rows * (seq_len + 1)].reshape(rows, seq_len + 1).astype(np.int32)


def segment_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """`(B, T)` document number of each position within its row: 0 for the document the row
    starts in, +1 after every `EOS` (an `EOS` belongs to the document it ends)."""
    ends = (tokens == eos_id).long()
    return torch.cumsum(ends, dim=1) - ends  # (B, T)


def block_causal_mask(tokens: Tensor, eos_id: int) -> Tensor:
    """`(B, T, T)` bool: position i may attend to j when j <= i and both are one document."""
    segments = segment_ids(tokens, eos_id)  # (B, T)
    length = tokens.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
    return (segments[:, :, None] == segments[:, None, :]) & causal  # (B, T, T)


@dataclass
class TextSource:
    """Packed rows per split plus the index's `extra` (tokenizer, eos_id, vocab_size, seq_len)."""

    schema: InputSchema
    chunks: Iterator[Chunk]
    total: int
    extra: dict[str, Any]


def read_documents(path: Path, text_field: str) -> list[str]:
    """Documents of a text source: a JSONL/CSV/Parquet column, one `.txt` file, or every text
    file under a folder (one document per file).

    Raises:
        DataError: For a missing field or a folder without text files.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"{path} holds no text files", f"use {', '.join(TEXT_SUFFIXES)}")
        return [p.read_text(encoding="utf-8", errors="replace") for p in files]
    if path.suffix in TEXT_SUFFIXES:
        return [path.read_text(encoding="utf-8", errors="replace")]
    from .tabular import read_table

    table = read_table(path)
    if text_field not in table.column_names:
        raise DataError(
            f"field {text_field!r} is not in {path}",
            f"pass --text-field, one of: {', '.join(table.column_names)}",
        )
    return [str(v) if v is not None else "" for v in table.column(text_field).to_pylist()]


def split_documents(
    num_docs: int, fractions: Sequence[float] | None, seed: int, shuffle: bool
) -> dict[str, list[int]]:
    """Document numbers per split (by a seeded hash of the number; all `train` without
    fractions), each split in a seeded order (or the source's order without shuffle)."""
    order = np.arange(num_docs)
    if shuffle:
        order = np.random.default_rng(derive_seed(seed, SPLIT_STREAM, 2)).permutation(num_docs)
    if fractions is None:
        return {"train": order.tolist()}
    edges = np.cumsum(fractions) / sum(fractions)
    names = ["train", "val", "test"][: len(edges)]
    parts: dict[str, list[int]] = {name: [] for name in names}
    for doc in order.tolist():
        draw = derive_seed(seed, SPLIT_STREAM, doc) / float(1 << 63)
        parts[names[min(int(np.searchsorted(edges, draw, side="right")), len(names) - 1)]].append(
            doc
        )
    return parts


def _chunks(rows: dict[str, np.ndarray]) -> Iterator[Chunk]:
    for split, packed in rows.items():
        for start in range(0, len(packed), _CHUNK_ROWS):
            yield Chunk(split, packed[start : start + _CHUNK_ROWS], None)


def text_source(
    docs_by_split: dict[str, list[list[int]]], tokenizer: Tokenizer, seq_len: int, source: str
) -> TextSource:
    """Packs tokenized documents per split into a `TextSource`.

    Raises:
        DataError: When a split has fewer than `seq_len + 1` tokens.
    """
    rows = {
        split: pack_rows(docs, seq_len, tokenizer.eos_id) for split, docs in docs_by_split.items()
    }
    for split, packed in rows.items():
        if len(packed) == 0:
            raise DataError(
                f"split {split!r} of {source} has fewer than seq_len + 1 = {seq_len + 1} tokens",
                "lower --seq-len or add text",
            )
    extra = {
        "task": "language_model",
        "tokenizer": tokenizer.name,
        "eos_id": tokenizer.eos_id,
        "vocab_size": tokenizer.vocab_size,
        "seq_len": seq_len,
        "documents": {split: len(docs) for split, docs in docs_by_split.items()},
    }
    schema = InputSchema("raw", "int32", (seq_len + 1,))
    return TextSource(schema, _chunks(rows), sum(len(r) for r in rows.values()), extra)


def pytext_source(options: dict[str, Any], fractions: Sequence[float], seed: int) -> TextSource:
    """`builtin:pytext` packed exactly as the in-memory source packs it (same rows)."""

    parts, vocab = load_pytext_splits(options, fractions, seed)
    rows = {
        name: torch.cat([inputs, targets[:, -1:]], dim=1).numpy().astype(np.int32)
        for name, (inputs, targets) in zip(("train", "val", "test"), parts, strict=True)
    }
    tokenizer = byte_tokenizer()
    seq_len = int(parts[0][0].shape[1])
    extra = {
        "task": "language_model",
        "tokenizer": "bytes",
        "eos_id": tokenizer.eos_id,
        "vocab_size": vocab,
        "seq_len": seq_len,
    }
    schema = InputSchema("raw", "int32", (seq_len + 1,))
    return TextSource(schema, _chunks(rows), sum(len(r) for r in rows.values()), extra)


def file_text_source(
    path: Path,
    *,
    tokenizer_name: str,
    text_field: str,
    seq_len: int,
    fractions: Sequence[float] | None,
    seed: int,
    shuffle: bool,
) -> TextSource:
    """Reads, splits (by document), tokenizes and packs a text source at `path`."""
    tokenizer = build_tokenizer(tokenizer_name)
    docs = read_documents(path, text_field)
    parts = split_documents(len(docs), fractions, seed, shuffle)
    tokenized = {split: [tokenizer.encode(docs[k]) for k in ids] for split, ids in parts.items()}
    logger.info("%d documents tokenized with %s", len(docs), tokenizer.name)
    return text_source(tokenized, tokenizer, seq_len, str(path))
