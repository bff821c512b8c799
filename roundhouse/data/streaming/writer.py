"""Writes Parquet shards of a target size plus `index.json`, to any fsspec URL.

Each shard is built in memory (at most about `shard_bytes`), hashed, then uploaded with one
write; row groups of `block_rows` rows are the shuffle blocks the streaming reader permutes.
The index goes last, so readers never see a half-written dataset.
"""

from __future__ import annotations

import hashlib
import io
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from roundhouse.errors import DataError

from .codec import check_schema, encode_inputs, target_column
from .index import INDEX_NAME, Index, InputSchema, ShardInfo, write_index
from .storage import join, open_url, storage_errors, write_atomic

logger = logging.getLogger(__name__)

CODECS = ("zstd", "snappy", "lz4", "gzip", "none")
_BLOCK_BYTES = 2 << 20  # rows per row group aim at ~2 MB: fine-grained shuffle, cheap reads
_PAGE_BYTES = 1 << 30  # never split a block into several pages


@dataclass(frozen=True)
class Chunk:
    """A batch of samples for one split: inputs `(N, *shape)` and optional int64 targets."""

    split: str
    inputs: np.ndarray
    targets: np.ndarray | None


@dataclass(frozen=True)
class WriteConfig:
    """How to write: shard size in bytes, compression codec, rows per block (0: automatic)."""

    shard_bytes: int = 64 << 20
    codec: str = "zstd"
    block_rows: int = 0
    overwrite: bool = False


def parse_size(text: str) -> int:
    """`64MB`, `1GB`, `512k` or a plain byte count -> bytes.

    Raises:
        DataError: When the text is not a positive size.
    """
    units = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = cleaned, ""
    if cleaned and cleaned[-1] in units:
        number, unit = cleaned[:-1], cleaned[-1]
    try:
        size = int(float(number) * units[unit])
    except ValueError:
        size = 0
    if size <= 0:
        raise DataError(f"{text!r} is not a size", "write it like 64MB, 512KB or 1GB")
    return size


class _SplitWriter:
    """Accumulates one split's rows into shards of about `shard_bytes`."""

    def __init__(self, owner: DatasetWriter, split: str) -> None:
        self.owner, self.split = owner, split
        self.buffer: io.BytesIO | None = None
        self.writer: pq.ParquetWriter | None = None
        self.blocks: list[int] = []
        self.count = 0

    def add(self, table: pa.Table) -> None:
        if self.writer is None:
            self.buffer = io.BytesIO()
            self.writer = pq.ParquetWriter(
                self.buffer,
                table.schema,
                compression=self.owner.codec,
                # One plain page per block, no dictionary, no min/max of sample bytes: what the
                # reader's zero-copy path (`fastraw`) reads for uncompressed raw inputs.
                use_dictionary=["target"],
                write_statistics=["target"],
                data_page_size=_PAGE_BYTES,
            )
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.blocks.append(table.num_rows)
        if self.buffer.tell() >= self.owner.config.shard_bytes:
            self.close()

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        data = self.buffer.getvalue()
        name = f"{self.split}-{self.count:05d}.parquet"
        self.owner.upload(name, data)
        self.owner.shards.append(
            ShardInfo(
                name,
                self.split,
                sum(self.blocks),
                len(data),
                hashlib.sha256(data).hexdigest(),
                tuple(self.blocks),
            )
        )
        self.writer, self.buffer, self.blocks = None, None, []
        self.count += 1


class DatasetWriter:
    """Writes chunks of samples as Parquet shards and, on `close`, the index.

    Args:
        url: Destination folder (any fsspec URL).
        schema: How inputs are stored.
        num_classes: Number of target classes, or None without targets.
        config: Shard size, codec, block rows, overwrite.
        source: The source's name, recorded in the index.
        storage_options: Passed to fsspec.
        extra: Stored in the index as is (e.g. a text dataset's tokenizer).

    Raises:
        DataError: When the destination already holds a dataset (without `overwrite`), or
            cannot be written.
    """

    def __init__(
        self,
        url: str,
        schema: InputSchema,
        *,
        num_classes: int | None,
        config: WriteConfig,
        source: str = "",
        storage_options: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        check_schema(schema)
        if config.codec not in CODECS:
            raise DataError(f"unknown codec {config.codec!r}", f"valid: {', '.join(CODECS)}")
        self.url, self.schema, self.num_classes = url, schema, num_classes
        self.config, self.source, self.extra = config, source, dict(extra or {})
        self.codec = "none" if config.codec == "none" else config.codec
        self.fs, self.root = open_url(url, storage_options)
        self.block_rows = config.block_rows or self._auto_block_rows()
        self.shards: list[ShardInfo] = []
        self.splits: dict[str, _SplitWriter] = {}
        self._pending: dict[str, list[pa.Table]] = {}
        self._prepare_destination()

    def _auto_block_rows(self) -> int:
        item = int(np.prod(self.schema.shape)) * np.dtype(self.schema.dtype).itemsize
        return max(1, min(_BLOCK_BYTES // max(item, 1), self.config.shard_bytes // max(item, 1)))

    def _prepare_destination(self) -> None:
        index_path = join(self.root, INDEX_NAME)
        with storage_errors("destination", self.url, "check the URL"):
            exists = self.fs.exists(index_path)
            if exists and not self.config.overwrite:
                raise DataError(
                    f"{self.url} already holds a dataset", "pass --overwrite to replace it"
                )
            if exists:
                # The old index goes first, so a crash below leaves no index pointing at a
                # mix of old and new shards.
                self.fs.rm_file(index_path)
            self.fs.makedirs(self.root, exist_ok=True)

    def upload(self, name: str, data: bytes) -> None:
        """Writes one finished shard."""
        with storage_errors(f"shard {name}", join(self.url, name), "check the destination"):
            write_atomic(self.fs, join(self.root, name), data)
        logger.debug("wrote %s (%d bytes)", name, len(data))

    def add(self, chunk: Chunk) -> None:
        """Adds samples; full blocks are written as they fill up."""
        columns = {"input": encode_inputs(chunk.inputs, self.schema)}
        if chunk.targets is not None:
            columns["target"] = target_column(chunk.targets)
        pending = self._pending.setdefault(chunk.split, [])
        pending.append(pa.table(columns))
        self._flush(chunk.split, final=False)

    def _flush(self, split: str, *, final: bool) -> None:
        if not self._pending.get(split):
            return
        table = pa.concat_tables(self._pending[split])
        writer = self.splits.setdefault(split, _SplitWriter(self, split))
        start = 0
        while table.num_rows - start >= self.block_rows or (final and start < table.num_rows):
            writer.add(table.slice(start, self.block_rows))
            start += self.block_rows
        self._pending[split] = [table.slice(start)] if start < table.num_rows else []

    def close(self) -> Index:
        """Writes the remaining rows, the last shards and then the index.

        Raises:
            DataError: When no sample was written.
        """
        for split in list(self._pending):
            self._flush(split, final=True)
        for writer in self.splits.values():
            writer.close()
        if not self.shards:
            raise DataError(f"the source has no samples to write to {self.url}")
        index = Index(
            input=self.schema,
            num_classes=self.num_classes,
            codec=self.codec,
            shards=tuple(self.shards),
            source=self.source,
            extra=self.extra,
        )
        with storage_errors("dataset index", join(self.url, INDEX_NAME), "check the destination"):
            write_index(self.fs, self.root, index)
        return index


def write_dataset(
    url: str,
    chunks: Iterable[Chunk],
    schema: InputSchema,
    *,
    num_classes: int | None,
    config: WriteConfig,
    total: int | None = None,
    source: str = "",
    storage_options: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Index:
    """Writes all `chunks` to `url` with a progress bar (on a terminal) and returns the index.

    `extra` is stored in the index as is (text datasets record their tokenizer there).
    """
    writer = DatasetWriter(
        url,
        schema,
        num_classes=num_classes,
        config=config,
        source=source,
        storage_options=storage_options,
        extra=extra,
    )
    with _Progress(total) as advance:
        for chunk in chunks:
            writer.add(chunk)
            advance(len(chunk.inputs))
    index = writer.close()
    logger.info("wrote %d shards, %s rows to %s", len(index.shards), index.splits, url)
    return index


class _Progress:
    """A rich progress bar on stderr, only when stderr is a terminal (logs stay clean)."""

    def __init__(self, total: int | None) -> None:
        self.total, self.bar, self.task = total, None, None

    def __enter__(self) -> Callable[[int], None]:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self.bar = Progress(console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("writing shards", total=self.total)
        return self.advance

    def advance(self, rows: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, rows)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
