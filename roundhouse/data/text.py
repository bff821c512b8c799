"""Byte-level text: the tokenizer and `builtin:pytext`, Python's own standard library as a corpus.

Tokens are the 256 byte values plus four specials (`PAD`, `BOS`, `EOS`, `MASK`), so any text
round-trips exactly and no vocabulary has to be learned or downloaded.

`builtin:pytext` reads the `.py` files under `sysconfig.get_paths()["stdlib"]` (site-packages
excluded). It is a real corpus that ships with every Python. The files are sorted, permuted with
the run seed and cut into train/val/test **by file** (a split never sees another split's
files). Each split's documents are concatenated with `EOS` between them and cut into chunks of
`seq_len + 1` tokens; a sample is `input = chunk[:-1]`, `target = chunk[1:]`, both `(seq_len,)`
int64, so the same arrays serve next-token prediction and (through the input) masked-LM.
"""

from __future__ import annotations

import logging
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from roundhouse.errors import DataError

from .sampler import SPLIT_STREAM, seeded_generator

logger = logging.getLogger(__name__)

NUM_BYTES = 256
PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
MASK_ID = 259
VOCAB_SIZE = 260
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID, "<mask>": MASK_ID}

PYTEXT_OPTIONS = ("seq_len", "max_bytes")
DEFAULT_SEQ_LEN = 128
DEFAULT_MAX_BYTES = 8_000_000


def encode(text: str | bytes, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Byte ids of `text` (UTF-8 for `str`), optionally framed by `BOS`/`EOS`."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return [BOS_ID] * bos + list(data) + [EOS_ID] * eos


def decode(ids: Sequence[int] | Tensor) -> str:
    """Text of byte ids; special ids are dropped and invalid UTF-8 is replaced, never raised."""
    values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    return bytes(i for i in values if 0 <= i < NUM_BYTES).decode("utf-8", errors="replace")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files, sorted, without third-party site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    skip = {"site-packages", "dist-packages"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return sorted(files)


def select_files(files: list[Path], max_bytes: int, seed: int) -> list[tuple[Path, bytes]]:
    """Files in a seeded order, read until `max_bytes`: a random sample, not the A-to-C ones."""
    order = torch.randperm(len(files), generator=seeded_generator(seed, SPLIT_STREAM)).tolist()
    chosen, total = [], 0
    for index in order:
        data = files[index].read_bytes()
        if not data:
            continue
        chosen.append((files[index], data))
        total += len(data)
        if total >= max_bytes:
            break
    return chosen


def split_by_bytes(
    docs: list[bytes], fractions: Sequence[float]
) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """Cuts the document list where the running byte count crosses the split fractions.

    Every split keeps at least one document, so one large file cannot leave val or test empty.

    Raises:
        DataError: Fewer than three documents.
    """
    if len(docs) < 3:
        raise DataError(
            f"builtin:pytext: {len(docs)} files cannot fill the three splits {list(fractions)}",
            "raise data.options.max_bytes",
        )
    ends = torch.tensor([len(d) for d in docs]).cumsum(0) / sum(len(d) for d in docs)  # (n,)
    train_end = int((ends < fractions[0]).sum()) + 1
    train_end = min(max(train_end, 1), len(docs) - 2)
    val_end = int((ends < fractions[0] + fractions[1]).sum()) + 1
    val_end = min(max(val_end, train_end + 1), len(docs) - 1)
    return docs[:train_end], docs[train_end:val_end], docs[val_end:]


def _doc_ids(doc: bytes, encoder: Callable[[bytes], list[int]] | None) -> Tensor:
    if encoder is None:
        return torch.frombuffer(bytearray(doc), dtype=torch.uint8)
    return torch.tensor(encoder(doc), dtype=torch.int64)


def pack_documents(
    docs: Sequence[bytes], seq_len: int, encoder: Callable[[bytes], list[int]] | None = None
) -> tuple[Tensor, Tensor]:
    """Concatenates `docs` (bytes, or the ids of `encoder`) with `EOS` after each and cuts
    chunks of `seq_len + 1` tokens.

    Returns:
        `(inputs, targets)`, each `(N, seq_len)` int64, with `targets` shifted left by one.
    """
    eos = torch.tensor([EOS_ID])
    pieces = [t for doc in docs for t in (_doc_ids(doc, encoder), eos)]
    stream = torch.cat([piece.long() for piece in pieces])  # (L,)
    num_chunks = (stream.numel() - 1) // (seq_len + 1)
    if num_chunks < 1:
        raise DataError(
            f"builtin:pytext: a split has {stream.numel()} tokens, fewer than seq_len+1",
            "lower data.options.seq_len or raise data.options.max_bytes",
        )
    chunks = stream[: num_chunks * (seq_len + 1)].view(num_chunks, seq_len + 1)
    return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()  # (N, T), (N, T)


def positive_int_option(options: dict[str, Any], name: str, default: int) -> int:
    """`data.options[name]` (default `default`), which must be a positive integer.

    Raises:
        DataError: Not a positive integer (the option and an example named).
    """
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(
            f"data.options.{name} must be a positive integer, got {value!r}",
            f"set data.options.{name} to e.g. {default}",
        )
    return value


def load_pytext_splits(
    options: dict[str, Any],
    split: Sequence[float],
    seed: int,
    encoder: Callable[[bytes], list[int]] | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """Reads, splits by file and packs the stdlib corpus.

    Args:
        options: `seq_len` (default 128) and `max_bytes` (default 8 MB, a cap on the corpus).
        split: Train/val/test fractions, applied to bytes at file boundaries.
        seed: The run seed, which picks and orders the files.
        encoder: Bytes -> ids (default: the bytes themselves; see `data.text_tokens`).

    Returns:
        `[(inputs, targets)]` for train, val and test, and the vocabulary size.

    Raises:
        DataError: An unknown or invalid option, or too little text for a split.
    """
    unknown = sorted(set(options) - set(PYTEXT_OPTIONS))
    if unknown:
        raise DataError(
            f"unknown option {unknown[0]!r} for source builtin:pytext",
            f"valid options: {', '.join(PYTEXT_OPTIONS)}",
        )
    seq_len = positive_int_option(options, "seq_len", DEFAULT_SEQ_LEN)
    max_bytes = positive_int_option(options, "max_bytes", DEFAULT_MAX_BYTES)
    chosen = select_files(stdlib_files(), max_bytes, seed)
    docs = split_by_bytes([data for _, data in chosen], split)
    packed = [pack_documents(part, seq_len, encoder) for part in docs]
    logger.info(
        "pytext: %d files, %d bytes, chunks %s",
        len(chosen),
        sum(len(d) for _, d in chosen),
        [p[0].shape[0] for p in packed],
    )
    return packed, VOCAB_SIZE
