"""The `index.json` of a prepared dataset: format version, schema, shards, splits, codec.

The index is the only thing that makes a dataset visible: `prepare` writes it last, so a
crashed or interrupted prepare leaves no index and nothing that looks usable.

Layout of a dataset folder::

    index.json
    train-00000.parquet   # row groups are the shuffle blocks
    val-00000.parquet
    ...
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from roundhouse.errors import DataError

from .storage import join, open_url, storage_errors, write_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_NAME = "index.json"
_PREPARE_FIX = "run `roundhouse data prepare SOURCE URL` first, or check the URL"


@dataclass(frozen=True)
class InputSchema:
    """How the `input` column is stored.

    Attributes:
        encoding: `raw` (the tensor's bytes, C order) or `png`.
        dtype: numpy dtype of the decoded array: `uint8` or `float32`.
        shape: Per-sample shape, e.g. `[3, 64, 64]` (C, H, W for images).
    """

    encoding: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file. `blocks` lists the rows of each row group (shuffle block)."""

    name: str
    split: str
    rows: int
    bytes: int
    sha256: str
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Index:
    """A prepared dataset's description, as stored in `index.json`."""

    input: InputSchema
    num_classes: int | None
    codec: str
    shards: tuple[ShardInfo, ...]
    source: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def splits(self) -> dict[str, int]:
        """Rows per split, in first-seen order."""
        rows: dict[str, int] = {}
        for shard in self.shards:
            rows[shard.split] = rows.get(shard.split, 0) + shard.rows
        return rows

    def split_shards(self, split: str) -> list[ShardInfo]:
        """The shards of `split` in storage order.

        Raises:
            DataError: When the dataset has no such split.
        """
        shards = [shard for shard in self.shards if shard.split == split]
        if not shards:
            raise DataError(
                f"dataset has no split {split!r}",
                f"valid splits: {', '.join(self.splits) or 'none'}",
            )
        return shards

    def to_json(self) -> str:
        """The `index.json` text (the splits summary is stored too, for humans and tools)."""
        body = asdict(self)
        body["splits"] = {
            name: {"rows": rows, "shards": [s.name for s in self.shards if s.split == name]}
            for name, rows in self.splits.items()
        }
        return json.dumps(body, indent=1)

    @classmethod
    def from_json(cls, text: str, where: str = "index.json") -> Index:
        """Parses `index.json` text.

        Raises:
            DataError: On invalid JSON, an unknown format version or missing fields.
        """
        try:
            body = json.loads(text)
            version = body.get("format_version")
            if version != FORMAT_VERSION:
                raise DataError(
                    f"{where} has format version {version}, this roundhouse reads {FORMAT_VERSION}",
                    "re-run roundhouse data prepare with this version",
                )
            schema = body["input"]
            return cls(
                input=InputSchema(schema["encoding"], schema["dtype"], tuple(schema["shape"])),
                num_classes=body["num_classes"],
                codec=body["codec"],
                shards=tuple(_shard(s) for s in body["shards"]),
                source=body.get("source", ""),
                extra=body.get("extra", {}),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"{where} is not a valid dataset index: {err!r}", _PREPARE_FIX) from err


def _shard(body: dict[str, Any]) -> ShardInfo:
    return ShardInfo(
        name=body["name"],
        split=body["split"],
        rows=int(body["rows"]),
        bytes=int(body["bytes"]),
        sha256=body["sha256"],
        blocks=tuple(int(b) for b in body["blocks"]),
    )


def read_index(url: str, storage_options: dict[str, Any] | None = None) -> Index:
    """Reads `<url>/index.json`.

    Raises:
        DataError: When the index is missing, unreadable (credentials) or invalid.
    """
    fs, root = open_url(url, storage_options)
    path = join(root, INDEX_NAME)
    with storage_errors("dataset index", f"{url.rstrip('/')}/{INDEX_NAME}", _PREPARE_FIX):
        text = fs.cat_file(path).decode("utf-8")
    return Index.from_json(text, where=f"{url.rstrip('/')}/{INDEX_NAME}")


def write_index(fs: Any, root: str, index: Index) -> None:
    """Writes `index.json` atomically; call it after every shard is written."""
    write_atomic(fs, join(root, INDEX_NAME), index.to_json().encode("utf-8"))
