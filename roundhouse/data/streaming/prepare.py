"""`roundhouse data prepare`: read a source, write it as a streaming dataset.

A source becomes a `Prepared`: the input schema, the class count and an iterator of `Chunk`s.
Sources: `builtin:digits`, `builtin:synthetic`, an image folder (one subfolder per class),
`.npy`/`.npz` arrays, CSV/JSONL, Parquet/Arrow files, and a Hugging Face `save_to_disk` folder;
text (`builtin:pytext`, or any source with `--tokenizer`) is tokenized and packed into rows of
`seq_len + 1` token ids (see `textprep`).

Rows of in-memory sources are shuffled once with the seed before writing, so a shard never
holds one class only (the streaming reader hands each rank a storage-ordered slice of every
global batch). Without built-in splits, `split` fractions assign each row by a hash of
(seed, row), so even sources read in pieces split the same way every time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from roundhouse.config import DataConfig
from roundhouse.errors import DataError

from ..sampler import SPLIT_STREAM, derive_seed
from ..sources import build_source_splits
from . import tabular
from .index import Index, InputSchema
from .writer import Chunk, WriteConfig, write_dataset

logger = logging.getLogger(__name__)

_CHUNK_ROWS = 4096


@dataclass
class PrepareOptions:
    """What `prepare` was asked for (the CLI's flags)."""

    image_format: str = "raw"
    image_size: int | None = None
    split: tuple[float, ...] | None = None
    seed: int = 0
    shuffle: bool = True
    input_field: str | None = None
    target_field: str | None = None
    target_kind: str = "auto"  # class | value | auto (see tabular.check_targets)
    source_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # text sources: `bytes` or a Hugging Face tokenizer
    text_field: str = "text"
    seq_len: int = 128


@dataclass
class Prepared:
    """A source ready to write."""

    schema: InputSchema
    num_classes: int | None
    chunks: Iterator[Chunk]
    total: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def assign_splits(num_rows: int, first_row: int, options: PrepareOptions) -> np.ndarray:
    """Split names for rows `first_row ..`: `train` unless `options.split` fractions are given."""
    if options.split is None:
        return np.full(num_rows, "train", dtype=object)
    edges = np.cumsum(options.split) / sum(options.split)
    draws = [
        derive_seed(options.seed, SPLIT_STREAM, row) / float(1 << 63)
        for row in range(first_row, first_row + num_rows)
    ]
    names = np.array(["train", "val", "test"][: len(edges)], dtype=object)
    return names[np.minimum(np.searchsorted(edges, draws, side="right"), len(edges) - 1)]


def chunks_by_split(
    inputs: np.ndarray, targets: np.ndarray | None, options: PrepareOptions, first_row: int = 0
) -> Iterator[Chunk]:
    """Cuts an in-memory batch into per-split `Chunk`s."""
    names = assign_splits(len(inputs), first_row, options)
    for split in dict.fromkeys(names):
        mask = names == split
        yield Chunk(split, inputs[mask], targets[mask] if targets is not None else None)


def _permutation(num_rows: int, options: PrepareOptions) -> np.ndarray:
    if not options.shuffle:
        return np.arange(num_rows)
    return np.random.default_rng(derive_seed(options.seed, SPLIT_STREAM, 1)).permutation(num_rows)


def _image_schema(sample_shape: Sequence[int], dtype: str, options: PrepareOptions) -> InputSchema:
    return InputSchema(options.image_format, dtype, tuple(int(d) for d in sample_shape))


def _to_stored(inputs: np.ndarray, options: PrepareOptions) -> np.ndarray:
    """Float images in [0, 1] become uint8 for PNG; raw keeps them exact."""
    if options.image_format == "png" and inputs.dtype != np.uint8:
        return np.clip(np.rint(inputs * 255.0), 0, 255).astype(np.uint8)
    return inputs if inputs.dtype == np.uint8 else inputs.astype(np.float32)


def from_arrays(
    inputs: np.ndarray, targets: np.ndarray | None, options: PrepareOptions
) -> Prepared:
    """A source held in memory: shuffled once, split, cut into chunks."""
    if targets is not None and len(targets) != len(inputs):
        raise DataError(f"{len(inputs)} inputs but {len(targets)} targets")
    inputs = _to_stored(inputs, options)
    order = _permutation(len(inputs), options)
    num_classes, extra = None, {}
    if targets is not None:
        targets = tabular.check_targets(np.asarray(targets), "target", options.target_kind)
        num_classes, extra = target_description(targets)

    def chunks() -> Iterator[Chunk]:
        for start in range(0, len(order), _CHUNK_ROWS):
            rows = order[start : start + _CHUNK_ROWS]
            yield from chunks_by_split(
                inputs[rows], targets[rows] if targets is not None else None, options, start
            )

    schema = _image_schema(inputs.shape[1:], str(inputs.dtype), options)
    return Prepared(schema, num_classes, chunks(), len(inputs), extra)


def target_description(targets: np.ndarray) -> tuple[int, dict[str, Any]]:
    """`(num_classes, index extra)` of checked targets: class ids count their classes; float
    values (regression) record `target_shape` and count the model outputs they need."""
    if targets.dtype.kind == "f":
        shape = list(targets.shape[1:])
        return int(np.prod(shape)) if shape else 1, {"target_shape": shape}
    return (int(targets.max()) + 1 if len(targets) else 0), {}


def _builtin(name: str, options: PrepareOptions) -> Prepared:
    """Built-ins keep their own seeded train/val/test split (the same as `build_splits`)."""
    fractions = options.split or (0.8, 0.1, 0.1)
    config = DataConfig(source=name, options=options.source_options, split=fractions)
    splits = build_source_splits(config, options.seed)
    parts = {"train": splits.train, "val": splits.val, "test": splits.test}
    sample_shape = splits.info.input_shape
    stored = "uint8" if options.image_format == "png" else "float32"

    def chunks() -> Iterator[Chunk]:
        for split, dataset in parts.items():
            yield Chunk(split, _to_stored(dataset.inputs.numpy(), options), dataset.targets.numpy())

    schema = _image_schema(sample_shape, stored, options)
    values = splits.info.target_shape
    extra = {} if values is None else {"target_shape": list(values)}
    total = sum(splits.info.num_samples.values())
    return Prepared(schema, splits.info.num_classes, chunks(), total, extra)


def _numpy(path: Path, options: PrepareOptions) -> Prepared:
    if path.suffix == ".npy":
        return from_arrays(np.load(path, allow_pickle=False), None, options)
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.keys())
        input_key = _pick(keys, options.input_field, ("input", "inputs", "x", "images"), path)
        target_key = _pick(keys, options.target_field, ("target", "targets", "y", "labels"), None)
        return from_arrays(archive[input_key], archive[target_key] if target_key else None, options)


def _pick(keys: list[str], wanted: str | None, defaults: Sequence[str], path: Path | None) -> str:
    if wanted is not None and wanted not in keys:
        raise DataError(f"field {wanted!r} is not in the source", f"fields: {', '.join(keys)}")
    found = wanted or next((k for k in defaults if k in keys), None)
    if found is None and path is not None:
        raise DataError(
            f"{path} has no input array (looked for {', '.join(defaults)})",
            f"pass --input-field, one of: {', '.join(keys)}",
        )
    return found


def _hf(path: Path, options: PrepareOptions) -> Prepared:
    """A Hugging Face dataset keeps its own splits."""
    parts = tabular.read_hf(path, options)
    prepared = {name: from_arrays(x, y, _one_split(options)) for name, (x, y) in parts.items()}
    first = next(iter(prepared.values()))

    def chunks() -> Iterator[Chunk]:
        for name, part in prepared.items():
            for chunk in part.chunks:
                yield Chunk(name, chunk.inputs, chunk.targets)

    classes = [p.num_classes for p in prepared.values() if p.num_classes is not None]
    total = sum(p.total or 0 for p in prepared.values())
    return Prepared(first.schema, max(classes) if classes else None, chunks(), total, first.extra)


def _one_split(options: PrepareOptions) -> PrepareOptions:
    from dataclasses import replace

    return replace(options, split=None)


def _image_folder(root: Path, options: PrepareOptions) -> Prepared:
    from .images import load_image_folder

    inputs, targets, classes = load_image_folder(root, options.image_size)
    logger.info("%d images in %d classes: %s", len(inputs), len(classes), ", ".join(classes))
    prepared = from_arrays(inputs, targets, options)
    prepared.num_classes = len(classes)
    return prepared


def _file_source(path: Path, options: PrepareOptions) -> Prepared:
    if path.is_dir() and tabular.is_hf_dataset(path):
        return _hf(path, options)
    if path.is_dir() and not tabular.table_files(path):
        return _image_folder(path, options)
    if path.suffix in (".npy", ".npz"):
        return _numpy(path, options)
    return from_arrays(*tabular.table_arrays(tabular.read_table(path), options), options)


def _text(prepared: Any) -> Prepared:
    return Prepared(prepared.schema, None, prepared.chunks, prepared.total, prepared.extra)


def _pytext(name: str, options: PrepareOptions) -> Prepared:
    """`builtin:pytext`: the rows the in-memory source trains on, byte tokens."""
    from .textprep import pytext_source

    if options.tokenizer not in (None, "bytes"):
        raise DataError(f"{name} is byte-tokenized", "drop --tokenizer or use --tokenizer bytes")
    source_options = {"seq_len": options.seq_len, **options.source_options}
    fractions = options.split or (0.8, 0.1, 0.1)
    return _text(pytext_source(source_options, fractions, options.seed))


def _text_file(path: Path, options: PrepareOptions) -> Prepared:
    from .textprep import file_text_source

    return _text(
        file_text_source(
            path,
            tokenizer_name=options.tokenizer or "bytes",
            text_field=options.text_field,
            seq_len=options.seq_len,
            fractions=options.split,
            seed=options.seed,
            shuffle=options.shuffle,
        )
    )


_BUILTINS: dict[str, Callable[[str, PrepareOptions], Prepared]] = {
    "builtin:digits": _builtin,
    "builtin:synthetic": _builtin,
    "builtin:diabetes": _builtin,
    "builtin:pytext": _pytext,
}


def build_source(source: str, options: PrepareOptions) -> Prepared:
    """Opens a source by name or path.

    Raises:
        DataError: For an unknown built-in, a missing path or a source that does not fit.
    """
    if source.startswith("builtin:"):
        if source not in _BUILTINS:
            raise DataError(
                f"unknown built-in source {source!r}", f"valid: {', '.join(sorted(_BUILTINS))}"
            )
        return _BUILTINS[source](source, options)
    path = Path(source)
    if not path.exists():
        raise DataError(f"source {source} does not exist", "check the path")
    if options.seq_len < 1:
        raise DataError(f"--seq-len must be positive, got {options.seq_len}")
    if options.tokenizer is not None:
        return _text_file(path, options)
    return _file_source(path, options)


def prepare(
    source: str,
    url: str,
    options: PrepareOptions,
    config: WriteConfig,
    storage_options: dict[str, Any] | None = None,
) -> Index:
    """Writes `source` as a streaming dataset at `url` and returns its index."""
    prepared = build_source(source, options)
    return write_dataset(
        url,
        prepared.chunks,
        prepared.schema,
        num_classes=prepared.num_classes,
        config=config,
        total=prepared.total,
        source=source,
        storage_options=storage_options,
        extra=prepared.extra,
    )
