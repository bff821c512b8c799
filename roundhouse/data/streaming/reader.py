"""Reads rows of a split by row number: block lookup, a small LRU of decoded blocks, prefetch."""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import pyarrow.parquet as pq
from torch import Tensor

from roundhouse.errors import DataError

from .cache import ShardCache
from .codec import decode_arrays, to_batch
from .index import Index, ShardInfo
from .order import Layout

logger = logging.getLogger(__name__)

_Decoded = tuple[np.ndarray, "np.ndarray | None"]


class BlockReader:
    """Turns sorted row numbers of one split into decoded batches.

    Args:
        index: The dataset index.
        shards: The split's shards, in storage order (the `Layout`'s order).
        cache: Where verified local copies come from.
        keep_blocks: Decoded blocks kept in memory (the working set of one window slice).
        prefetch_shards: Shards downloaded ahead of the one being read.
    """

    def __init__(
        self,
        index: Index,
        shards: list[ShardInfo],
        cache: ShardCache,
        *,
        keep_blocks: int = 16,
        prefetch_shards: int = 2,
    ) -> None:
        self.index, self.shards, self.cache = index, shards, cache
        self.layout = Layout(tuple(s.blocks for s in shards))
        self.starts = self.layout.block_starts
        self.block_shard = self.layout.shard_of_block()
        self.first_block = np.concatenate([[0], np.cumsum([len(s.blocks) for s in shards])])
        self.keep_blocks, self.prefetch_shards = keep_blocks, prefetch_shards
        self._blocks: OrderedDict[int, _Decoded | None] = OrderedDict()
        self._files: OrderedDict[int, pq.ParquetFile | None] = OrderedDict()
        self._upcoming: list[int] = []

    def plan_shards(self, shard_sequence: list[int]) -> None:
        """Tells the reader the order it will need shards in, for prefetching."""
        self._upcoming = list(dict.fromkeys(shard_sequence))

    def read(self, rows: np.ndarray) -> dict[str, Tensor]:
        """Decoded `{"input", "target"}` of `rows` (sorted row numbers), in that order.

        Rows of shards skipped as corrupt are left out.
        """
        blocks = np.searchsorted(self.starts, rows, side="right") - 1
        cuts = np.flatnonzero(np.diff(blocks)) + 1
        inputs, targets = [], []
        # Sorted rows: each block's rows are one contiguous run.
        for run in np.split(np.arange(len(rows)), cuts) if len(rows) else []:
            block = int(blocks[run[0]])
            decoded = self._block(block)
            if decoded is not None:
                offsets = rows[run] - self.starts[block]
                inputs.append(decoded[0][offsets])
                if decoded[1] is not None:
                    targets.append(decoded[1][offsets])
        if not inputs:
            return self._empty()
        stacked_targets = np.concatenate(targets) if targets else None
        return to_batch(np.concatenate(inputs), stacked_targets, self.index.input)

    def _empty(self) -> dict[str, Tensor]:
        import torch

        batch = {"input": torch.zeros((0, *self.index.input.shape))}
        if self.index.num_classes is not None:
            batch["target"] = torch.zeros(0, dtype=torch.int64)
        return batch

    def _block(self, block: int) -> _Decoded | None:
        if block in self._blocks:
            self._blocks.move_to_end(block)
            return self._blocks[block]
        shard = int(self.block_shard[block])
        file = self._file(shard)
        table = None
        if file is not None:
            table = file.read_row_group(block - int(self.first_block[shard]))
            if table.num_rows != self.layout.block_rows[block]:
                raise DataError(
                    f"shard {self.shards[shard].name} block {block - self.first_block[shard]} "
                    f"has {table.num_rows} rows, the index says {self.layout.block_rows[block]}",
                    "re-run roundhouse data prepare",
                )
        self._blocks[block] = None if table is None else decode_arrays(table, self.index.input)
        while len(self._blocks) > self.keep_blocks:
            self._blocks.popitem(last=False)
        return self._blocks[block]

    def _file(self, shard: int) -> pq.ParquetFile | None:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        self._prefetch_after(shard)
        path = self.cache.path(self.shards[shard])
        # Kept open: an open file stays readable even if another process evicts it.
        self._files[shard] = pq.ParquetFile(path, memory_map=True) if path is not None else None
        while len(self._files) > self.prefetch_shards + 2:
            self._files.popitem(last=False)
        return self._files[shard]

    def _prefetch_after(self, shard: int) -> None:
        if shard in self._upcoming:
            at = self._upcoming.index(shard)
            ahead = self._upcoming[at : at + 1 + self.prefetch_shards]
        else:
            ahead = [shard]
        self.cache.prefetch([self.shards[k] for k in ahead])

    def close(self) -> None:
        """Stops background downloads."""
        self.cache.close()
