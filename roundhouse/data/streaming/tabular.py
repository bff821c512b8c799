"""Tabular sources (CSV, JSONL, Parquet, Arrow, Hugging Face `save_to_disk`) as arrays.

A table becomes `inputs (N, F) float32` and optional integer `targets (N,)`: the target field
is `--target-field` or the first of `label`, `target`, `y`; the inputs are `--input-field` (a
column of equal-length numeric lists) or every other column, which must then be numeric.
Tables are read whole into memory.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from roundhouse.errors import DataError

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".arrow", ".feather", ".ipc")
_TARGET_DEFAULTS = ("label", "target", "y", "labels")
_HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


def table_files(path: Path) -> list[Path]:
    """Table files directly inside a folder, sorted (a folder of Parquet parts)."""
    return sorted(p for p in path.iterdir() if p.suffix in TABLE_SUFFIXES and p.is_file())


def is_hf_dataset(path: Path) -> bool:
    """True for a folder written by Hugging Face `Dataset(Dict).save_to_disk`."""
    return any((path / marker).exists() for marker in _HF_MARKERS)


def check_targets(targets: np.ndarray, name: str, kind: str = "auto") -> np.ndarray:
    """Class ids as int64, or value targets (regression) as float32 `(N,)` or `(N, D)`.

    `kind` is `class`, `value` or `auto`: values when the targets are vectors or floats with a
    fractional part, class ids otherwise (see `data prepare --target-kind`).

    Raises:
        DataError: For non-numeric or negative class labels, naming the field.
    """
    if targets.dtype == object and len(targets) and isinstance(targets[0], np.ndarray):
        targets = np.stack([np.asarray(t, dtype=np.float32) for t in targets])  # list column
    if targets.dtype.kind in "iuf" and is_value_targets(targets, kind):
        return targets.astype(np.float32)
    if targets.dtype.kind == "f" and np.all(np.mod(targets, 1) == 0):
        targets = targets.astype(np.int64)
    if targets.dtype.kind not in "iu":
        raise DataError(
            f"field {name!r} has {targets.dtype} values; class labels must be integers",
            "map labels to 0..K-1 first or pass --target-field with an integer column",
        )
    if len(targets) and targets.min() < 0:
        raise DataError(f"field {name!r} has negative class labels", "use labels 0..K-1")
    return targets.astype(np.int64)


def is_value_targets(targets: np.ndarray, kind: str) -> bool:
    """Whether `targets` are regression values rather than class ids (see `check_targets`)."""
    if kind != "auto":
        return kind == "value"
    fractional = targets.dtype.kind == "f" and not np.all(np.mod(targets, 1) == 0)
    return targets.ndim > 1 or fractional


def read_table(path: Path) -> pa.Table:
    """Reads a CSV, JSONL, Parquet or Arrow file, or a folder of them, into one table."""
    if path.is_dir():
        parts = table_files(path)
        if not parts:
            raise DataError(f"{path} holds no table files", f"use {', '.join(TABLE_SUFFIXES)}")
        return pa.concat_tables([read_table(p) for p in parts], promote_options="default")
    try:
        return _read_one(path)
    except pa.ArrowInvalid as err:
        raise DataError(f"cannot read {path}: {err}", "check the file's format") from err


def _read_one(path: Path) -> pa.Table:
    if path.suffix == ".csv":
        from pyarrow import csv

        return csv.read_csv(path)
    if path.suffix in (".jsonl", ".json"):
        from pyarrow import json

        return json.read_json(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if path.suffix in (".arrow", ".feather", ".ipc"):
        return _read_arrow(path)
    raise DataError(
        f"unknown source type {path.suffix!r} ({path})",
        "use an image folder, .npy/.npz, .csv, .jsonl, .parquet, .arrow or builtin:NAME",
    )


def _read_arrow(path: Path) -> pa.Table:
    import pyarrow.feather as feather
    import pyarrow.ipc as ipc

    try:
        return feather.read_table(path)
    except pa.ArrowInvalid:
        # Hugging Face writes Arrow *stream* files, not the file format feather reads.
        with pa.memory_map(str(path)) as source:
            return ipc.open_stream(source).read_all()


def _numeric(column: pa.ChunkedArray, name: str) -> np.ndarray:
    if not (
        pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
        or pa.types.is_boolean(column.type)
    ):
        raise DataError(
            f"field {name!r} has type {column.type}, which does not fit a numeric input",
            "drop the column, or name the inputs with --input-field and labels with --target-field",
        )
    if column.null_count:
        raise DataError(f"field {name!r} has {column.null_count} missing values", "fill them")
    return column.to_numpy().astype(np.float32)


def _list_input(column: pa.ChunkedArray, name: str) -> np.ndarray:
    if not (pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type)):
        return _numeric(column, name)[:, None]
    rows = column.to_pylist()
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise DataError(
            f"field {name!r} has lists of {len(lengths)} different lengths",
            "every sample needs the same input length",
        )
    return np.asarray(rows, dtype=np.float32)


def table_arrays(table: pa.Table, options: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Splits a table into float32 inputs and int64 targets (see the module docstring)."""
    names = table.column_names
    for wanted in (options.input_field, options.target_field):
        if wanted is not None and wanted not in names:
            raise DataError(f"field {wanted!r} is not in the source", f"fields: {', '.join(names)}")
    target = options.target_field or next((n for n in _TARGET_DEFAULTS if n in names), None)
    targets = None
    if target is not None:
        column = table.column(target).to_numpy(zero_copy_only=False)
        targets = check_targets(column, target, options.target_kind)
    if options.input_field is not None:
        return _list_input(table.column(options.input_field), options.input_field), targets
    features = [n for n in names if n != target]
    if not features:
        raise DataError("the source has no input fields", f"fields: {', '.join(names)}")
    return np.stack([_numeric(table.column(n), n) for n in features], axis=1), targets


def read_hf(path: Path, options: Any) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Arrays per split of a Hugging Face `save_to_disk` folder.

    Raises:
        DataError: When the `datasets` package is not installed.
    """
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"{path} is a Hugging Face dataset folder, and reading it needs the `datasets` package",
            "pip install datasets, or export the dataset to Parquet first",
        ) from err
    loaded = datasets.load_from_disk(str(path))
    parts = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    return {name: table_arrays(part.data.table, options) for name, part in parts.items()}
