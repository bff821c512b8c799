"""Python's own documented functions as a labelled corpus: `builtin:pydoc-cls`.

Every Python ships its standard library's source, and with it tens of thousands of docstrings
written by people. `stdlib_docstrings` parses (never imports) every stdlib `.py` file with `ast`
and collects each public function and method that has a docstring: its top-level package
(`json`, `email`, `asyncio`, ...; a single-file module is its own package), its qualified name,
its signature line (`def dumps(obj, *, skipkeys=False, ...):`) and its docstring.

`builtin:pydoc-pairs` is the same records as a translation task: the signature line -> the
docstring's first sentence (3,155 / 349 / 370 pairs after dropping repeats; split by a hash of
the signature line, so no signature is in two splits). Its ids are bytes (`tokenizer: bytes`)
or word pieces with byte fallback learned from the training split only (`tokenizer: words`,
`roundhouse.data.word_tokens`: some 3,200 pieces, a summary ~17 ids instead of ~52 bytes).

`builtin:pydoc-text` is the docstrings alone as a byte language-model corpus (the same hash
split; `fraction` keeps part of the training docstrings), for language-model fine-tuning.

`builtin:pydoc-cls` is text classification over that corpus: the input is the docstring, the
label is the package it belongs to. Only packages with at least `min_per_class` documented
functions are kept (the defaults keep a few dozen classes). The split is fixed and independent
of the run seed: a function goes to train/val/test by a SHA-256 hash of `module.qualname`
(80/10/10), so every run, rank and world size sees the same split and no function is in two
splits. Texts are UTF-8 bytes (the byte tokenizer of `roundhouse.data.text`), cut to `seq_len`
and padded with `PAD_ID`.

Tests, demos, private modules (`_pydecimal` restates `decimal`) and generated modules (`test`,
`tests`, `idlelib`, `lib2to3`, `turtledemo`, `__phello__`, `site-packages`) are skipped: they are
not the library's documentation. Parsing takes seconds, so the records are cached as JSON in the
temp folder under a name that hashes the stdlib files' paths, sizes and mtimes (never stale).

On CPython 3.11 the corpus holds 4,017 records, and the default `min_per_class=50` keeps 20
packages (asyncio, datetime, distutils, email, http, imaplib, importlib, inspect, logging,
mailbox, multiprocessing, operator, pathlib, pydoc, tarfile, tkinter, turtle, unittest, urllib,
xml): 1,978 / 230 / 262 train/val/test docstrings, from 38 (operator) to 472 (tkinter) per
class in train.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from roundhouse.errors import DataError

from .text import (
    BOS_ID,
    DEFAULT_SEQ_LEN,
    EOS_ID,
    PAD_ID,
    VOCAB_SIZE,
    decode,
    encode,
    pack_documents,
    positive_int_option,
)
from .unicode_pairs import unicode_pairs
from .word_tokens import WordPieces

logger = logging.getLogger(__name__)

SKIPPED_PARTS = frozenset(
    {"test", "tests", "idlelib", "lib2to3", "turtledemo", "__phello__", "site-packages"}
)
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
PYDOC_CLS_OPTIONS = ("seq_len", "min_per_class", "label_fraction")
DEFAULT_CLS_SEQ_LEN = 256
DEFAULT_MIN_PER_CLASS = 50


@dataclass(frozen=True)
class DocRecord:
    """One documented public function or method of the standard library.

    Attributes:
        package: Its top-level package (`email` for `email.mime.text`).
        module: Its dotted module name.
        qualname: `Class.method` or `function`.
        signature: The `def` line, e.g. `def dumps(obj, *, skipkeys=False):`.
        docstring: The cleaned docstring (`inspect.cleandoc` rules, via `ast.get_docstring`).
    """

    package: str
    module: str
    qualname: str
    signature: str
    docstring: str

    @property
    def key(self) -> str:
        """`module.qualname`: unique per record, and what the fixed split hashes."""
        return f"{self.module}.{self.qualname}"


def _module_name(path: Path, root: Path) -> str | None:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if SKIPPED_PARTS & set(parts) or any(p.startswith(("test_", "_")) for p in parts[:-1]):
        return None
    if parts[-1].startswith(("test_", "_")) and parts[-1] != "__init__":
        return None  # tests, and private modules (`_pydecimal` restates `decimal`)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    if not parts or parts[-1] == "__main__":
        return None
    return ".".join(parts)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns is not None else ""
    return f"{prefix} {node.name}({ast.unparse(node.args)}){returns}:"


def _public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef]]:
    """`(qualname, node)` for module-level functions and the methods of module-level classes."""
    found: list[tuple[str, Any]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((node.name, node))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.append((f"{node.name}.{item.name}", item))
    return [(name, node) for name, node in found if not node.name.startswith("_")]


def _records_of(path: Path, module: str) -> list[DocRecord]:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):  # a template or a bad-encoding test file
        return []
    records = []
    for qualname, node in _public_functions(tree):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            package = module.split(".")[0]
            records.append(DocRecord(package, module, qualname, _signature(node), doc.strip()))
    return records


@functools.lru_cache(maxsize=2)
def stdlib_docstrings(root: str | None = None) -> tuple[DocRecord, ...]:
    """Every documented public function and method of the standard library, in a fixed order.

    Args:
        root: The stdlib folder (default: this Python's, `sysconfig`'s `stdlib` path).

    Returns:
        The records, sorted by file path then position in the file.
    """
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = sorted(base.rglob("*.py"))
    cache = _cache_file(base, files)
    try:
        return tuple(DocRecord(*row) for row in json.loads(cache.read_text("utf-8")))
    except (OSError, ValueError, TypeError):
        pass  # no cache yet (or a foreign/corrupt one): parse
    records: list[DocRecord] = []
    for path in files:
        module = _module_name(path, base)
        if module is not None:
            records.extend(_records_of(path, module))
    _write_cache(cache, records)
    return tuple(records)


CACHE_VERSION = 1  # bump when the parsing rules change


def _cache_file(base: Path, files: list[Path]) -> Path:
    """A temp-folder file named by the stdlib's path, its files' sizes and mtimes, the Python
    version and the parsing rules: any change gives another name, so it is never stale."""
    digest = hashlib.sha256(f"{CACHE_VERSION} {sys.version} {base}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path} {stat.st_size} {stat.st_mtime_ns}".encode())
    return Path(tempfile.gettempdir()) / f"roundhouse-pydoc-{digest.hexdigest()[:20]}.json"


def _write_cache(cache: Path, records: list[DocRecord]) -> None:
    """Writes the records atomically (parsing takes seconds; every process would pay it)."""
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps([dataclasses.astuple(r) for r in records]), "utf-8")
        os.replace(tmp, cache)
    except OSError:
        logger.debug("could not cache the pydoc corpus at %s", cache)


def split_of(key: str, fractions: Sequence[float] = SPLIT_FRACTIONS) -> int:
    """0, 1 or 2 (train, val, test) for `key`, from its SHA-256: fixed for every run and seed."""
    value = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64
    if value < fractions[0]:
        return 0
    return 1 if value < fractions[0] + fractions[1] else 2


def class_names(records: Sequence[DocRecord], min_per_class: int) -> list[str]:
    """The packages with at least `min_per_class` records, sorted by name (label order)."""
    counts = Counter(r.package for r in records)
    return sorted(p for p, n in counts.items() if n >= min_per_class)


def encode_padded(
    texts: Sequence[str], seq_len: int, encoder: Callable[[str], list[int]] = encode
) -> Tensor:
    """Ids of each text (`encoder`, default bytes), cut to `seq_len` and right-padded with
    `PAD_ID`: `(N, seq_len)`."""
    out = torch.full((len(texts), seq_len), PAD_ID, dtype=torch.int64)
    for row, text in enumerate(texts):
        ids = encoder(text)[:seq_len]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def _unit_hash(key: str) -> float:
    """A fixed value in [0, 1) from the SHA-256 of `key`."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _fraction_option(options: dict[str, Any], name: str) -> float:
    value = options.get(name, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise DataError(
            f"data.options.{name} must be a fraction in (0, 1], got {value!r}",
            f"set data.options.{name} to e.g. 0.1",
        )
    return float(value)


def load_pydoc_classification(
    options: dict[str, Any], encoder: Callable[[str], list[int]] = encode
) -> tuple[list[tuple[Tensor, Tensor]], list[str]]:
    """`builtin:pydoc-cls`: docstring bytes `(N, seq_len)` labelled by package `(N,)`.

    Args:
        options: `seq_len` (default 256), `min_per_class` (default 50) and `label_fraction`
            (default 1): keep that fraction of the training docstrings (a fixed hash of each
            function's name picks them; val and test stay whole), for few-label fine-tuning.
        encoder: Text -> ids (default bytes; `data.text_tokens` for word pieces).

    Returns:
        `[(inputs, targets)]` for train, val and test (the fixed hash split), and the class
        names in label order.

    Raises:
        DataError: An unknown or invalid option, or fewer than two classes left.
    """
    unknown = sorted(set(options) - set(PYDOC_CLS_OPTIONS))
    if unknown:
        raise DataError(
            f"unknown option {unknown[0]!r} for source builtin:pydoc-cls",
            f"valid options: {', '.join(PYDOC_CLS_OPTIONS)}",
        )
    seq_len = positive_int_option(options, "seq_len", DEFAULT_CLS_SEQ_LEN)
    min_per_class = positive_int_option(options, "min_per_class", DEFAULT_MIN_PER_CLASS)
    fraction = _fraction_option(options, "label_fraction")
    records = stdlib_docstrings()
    names = class_names(records, min_per_class)
    if len(names) < 2:
        raise DataError(
            f"builtin:pydoc-cls: only {len(names)} package(s) have {min_per_class}+ docstrings",
            "lower data.options.min_per_class",
        )
    label = {name: i for i, name in enumerate(names)}
    parts: list[list[DocRecord]] = [[], [], []]
    for record in records:
        if record.package in label:
            parts[split_of(record.key)].append(record)
    parts[0] = [r for r in parts[0] if _unit_hash(f"labelled:{r.key}") < fraction]
    splits = [
        (
            encode_padded([r.docstring for r in part], seq_len, encoder),
            torch.tensor([label[r.package] for r in part], dtype=torch.int64),
        )
        for part in parts
    ]
    logger.info("pydoc-cls: %d classes, split sizes %s", len(names), [len(p) for p in parts])
    return splits, names


PYDOC_PAIRS_OPTIONS = ("src_len", "tgt_len", "tokenizer", "min_count")
DEFAULT_SRC_LEN = 64
DEFAULT_TGT_LEN = 64
TOKENIZERS = ("bytes", "words")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def first_sentence(docstring: str) -> str:
    """The docstring's summary: its first paragraph's first sentence, on one line.

    `"Serialize obj to a JSON formatted str.\n\nIf skipkeys..."` ->
    `"Serialize obj to a JSON formatted str."`.
    """
    paragraph = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    return _SENTENCE_END.split(paragraph, maxsplit=1)[0]


def encode_targets(
    texts: Sequence[str], tgt_len: int, encoder: Callable[[str], list[int]] = encode
) -> Tensor:
    """`(N, tgt_len + 1)`: `BOS`, the text's ids (cut to leave room), `EOS`, then `PAD`.

    A decoder reads `[:, :-1]` and predicts `[:, 1:]` (teacher forcing). `encoder` turns a text
    into ids (default the byte tokenizer).
    """
    out = torch.full((len(texts), tgt_len + 1), PAD_ID, dtype=torch.int64)
    for row, text in enumerate(texts):
        ids = [BOS_ID, *encoder(text)[: tgt_len - 1], EOS_ID]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return out


def pydoc_pairs(records: Sequence[DocRecord]) -> list[list[tuple[str, str]]]:
    """`(signature, first sentence)` pairs of train, val and test.

    The split hashes the signature line (not the function's name, as pydoc-cls does): the same
    signature (`def close(self):`, on dozens of classes) never appears in two splits, so a test
    source cannot be answered by looking its exact twin up in train. A pair whose signature and
    summary both occur earlier in the corpus is dropped (a method documented twice).
    """
    parts: list[list[tuple[str, str]]] = [[], [], []]
    seen: set[tuple[str, str]] = set()
    for record in records:
        pair = (record.signature, first_sentence(record.docstring))
        if pair[1] and pair not in seen:
            seen.add(pair)
            parts[split_of(pair[0])].append(pair)
    return parts


def _tokenizer_option(options: dict[str, Any]) -> str:
    name = options.get("tokenizer", "bytes")
    if name not in TOKENIZERS:
        raise DataError(
            f"data.options.tokenizer must be one of {', '.join(TOKENIZERS)}, got {name!r}",
            "use tokenizer: words (word pieces of the training split) or bytes",
        )
    return name


def text_pairs(source: str) -> Sequence[Sequence[tuple[str, str]]]:
    """The `(source, target)` texts of train, val and test of a pair source: `builtin:pydoc-pairs`
    or `builtin:unicode-pairs` (`roundhouse.data.unicode_pairs`)."""
    if source == "builtin:unicode-pairs":
        return unicode_pairs()
    return pydoc_pairs(stdlib_docstrings())


@functools.lru_cache(maxsize=8)
def _word_pieces(source: str, min_count: int) -> WordPieces:
    train = text_pairs(source)[0]
    return WordPieces.build([text for pair in train for text in pair], min_count=min_count)


def pairs_tokenizer(
    options: dict[str, Any], source: str = "builtin:pydoc-pairs"
) -> WordPieces | None:
    """The tokenizer a pair source uses with these options: None for bytes, else the word
    pieces of its training split's sources and targets (seen `min_count`+ times).

    Raises:
        DataError: An unknown tokenizer or a bad `min_count`.
    """
    if _tokenizer_option(options) == "bytes":
        return None
    return _word_pieces(source, positive_int_option(options, "min_count", 2))


def pairs_encoder(tokenizer: WordPieces | None) -> Callable[[str], list[int]]:
    """Text -> ids for `tokenizer` (bytes when None)."""
    return encode if tokenizer is None else tokenizer.encode


def pairs_decoder(tokenizer: WordPieces | None) -> Callable[[Sequence[int]], str]:
    """Ids -> text for `tokenizer` (bytes when None); specials dropped."""
    return decode if tokenizer is None else tokenizer.decode


def load_pydoc_pairs(
    options: dict[str, Any], source: str = "builtin:pydoc-pairs"
) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """`builtin:pydoc-pairs`: signature ids `(N, src_len)` -> summary `(N, tgt_len + 1)` (and
    `builtin:unicode-pairs`, name -> decomposition, with the same options).

    Args:
        options: `src_len` and `tgt_len` (default 64 each, in tokens), `tokenizer` (`bytes`,
            the default, or `words`: `WordPieces` built from the training split) and, for
            words, `min_count` (default 2).

    Returns:
        `[(inputs, targets)]` for train, val and test (the same fixed hash split as
        pydoc-cls), and the vocabulary size.
    """
    unknown = sorted(set(options) - set(PYDOC_PAIRS_OPTIONS))
    if unknown:
        raise DataError(
            f"unknown option {unknown[0]!r} for source {source}",
            f"valid options: {', '.join(PYDOC_PAIRS_OPTIONS)}",
        )
    src_len = positive_int_option(options, "src_len", DEFAULT_SRC_LEN)
    tgt_len = positive_int_option(options, "tgt_len", DEFAULT_TGT_LEN)
    tokenizer = pairs_tokenizer(options, source)
    encoder = pairs_encoder(tokenizer)
    parts = text_pairs(source)
    logger.info("%s: split sizes %s", source, [len(p) for p in parts])
    encoded = [
        (
            encode_padded([s for s, _ in part], src_len, encoder),
            encode_targets([t for _, t in part], tgt_len, encoder),
        )
        for part in parts
    ]
    return encoded, VOCAB_SIZE if tokenizer is None else tokenizer.vocab_size


PYDOC_TEXT_OPTIONS = ("seq_len", "fraction")


def load_pydoc_text(
    options: dict[str, Any], encoder: Callable[[bytes], list[int]] | None = None
) -> list[tuple[Tensor, Tensor]]:
    """`builtin:pydoc-text`: the docstrings as a byte language-model corpus.

    Every docstring of the corpus goes to train/val/test by the fixed hash of `module.qualname`
    (the split of pydoc-cls); each split's docstrings are joined with `EOS` and cut into
    chunks, as `builtin:pytext` does (`input = chunk[:-1]`, `target = chunk[1:]`).

    Args:
        options: `seq_len` (default 128) and `fraction` (default 1): keep that fraction of the
            training docstrings (a fixed hash picks them; val and test stay whole).

    Returns:
        `[(inputs, targets)]` for train, val and test, each `(N, seq_len)`.
    """
    unknown = sorted(set(options) - set(PYDOC_TEXT_OPTIONS))
    if unknown:
        raise DataError(
            f"unknown option {unknown[0]!r} for source builtin:pydoc-text",
            f"valid options: {', '.join(PYDOC_TEXT_OPTIONS)}",
        )
    seq_len = positive_int_option(options, "seq_len", DEFAULT_SEQ_LEN)
    fraction = _fraction_option(options, "fraction")
    parts: list[list[bytes]] = [[], [], []]
    for record in stdlib_docstrings():
        part = split_of(record.key)
        if part or _unit_hash(f"text:{record.key}") < fraction:
            parts[part].append(record.docstring.encode("utf-8"))
    logger.info("pydoc-text: docstrings per split %s", [len(p) for p in parts])
    return [pack_documents(part, seq_len, encoder) for part in parts]


__all__ = [
    "VOCAB_SIZE",
    "DocRecord",
    "class_names",
    "encode_padded",
    "encode_targets",
    "first_sentence",
    "load_pydoc_classification",
    "load_pydoc_pairs",
    "load_pydoc_text",
    "pairs_decoder",
    "pairs_encoder",
    "pairs_tokenizer",
    "pydoc_pairs",
    "split_of",
    "stdlib_docstrings",
    "text_pairs",
]
