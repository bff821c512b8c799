"""Zero-copy reads of raw, uncompressed `input` columns straight from a memory-mapped shard.

Decoding a Parquet `BYTE_ARRAY` column into Arrow copies every value (Arrow keeps values
without the 4-byte length each one carries in the file). For raw tensors stored uncompressed,
`PLAIN`-encoded and without a dictionary (what `data prepare --codec none` writes), a row
group's values sit in the file as one run of `[length][bytes]` records at the end of its data
page. This module finds that run and returns a strided view of it, so the reader gathers the
samples of a step directly from the page cache: one copy fewer per sample than decoding.

The view is used only when the layout is certain: the column chunk is uncompressed, has no
dictionary page, and every record's length prefix equals the sample size, which also proves the
chunk is a single page (a second page header would shift the records). Anything else returns
None and the reader decodes through pyarrow as usual.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_LENGTH_BYTES = 4


def plain_values(
    mapped: np.ndarray, column: Any, num_rows: int, item_bytes: int
) -> np.ndarray | None:
    """`(num_rows, item_bytes)` uint8 view of a column chunk's values, or None.

    Args:
        mapped: The whole shard file as a read-only uint8 memory map.
        column: The chunk's `pyarrow.parquet.ColumnChunkMetaData`.
        num_rows: Rows in the row group.
        item_bytes: Bytes of one sample's value.
    """
    if column.compression != "UNCOMPRESSED" or column.has_dictionary_page or num_rows == 0:
        return None
    stride = _LENGTH_BYTES + item_bytes
    end = column.data_page_offset + column.total_compressed_size
    start = end - num_rows * stride
    if start < column.data_page_offset or end > mapped.shape[0]:
        return None
    records = mapped[start:end].reshape(num_rows, stride)
    lengths = np.ascontiguousarray(records[:, :_LENGTH_BYTES]).view("<u4")[:, 0]
    if not np.all(lengths == item_bytes):
        return None
    return records[:, _LENGTH_BYTES:]


def map_file(path: str) -> np.ndarray:
    """A read-only uint8 memory map of a whole file (valid after the file is deleted)."""
    # A plain ndarray view: `np.memmap` runs Python code on every slice of it.
    return np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
