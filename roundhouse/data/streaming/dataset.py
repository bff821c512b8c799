"""`StreamingDataset`: one rank's optimizer steps streamed from a prepared dataset URL.

Each item is what `StepLoader` yields: a list of `grad_accum_steps` micro-batches
`{"input": (b, ...), "target": (b,)}`, this rank's share of one global batch (see
`roundhouse.data.streaming.order` for the order, the partition and the remainder policy).
DataLoader workers split the steps round-robin (worker `w` of `n` makes steps `w, w + n, ...`),
which is exactly the order a DataLoader hands items back in, so the output does not depend on
the number of workers. `StreamingLoader` wraps the dataset in that DataLoader and tracks the
position for checkpoints: `{"epoch", "steps_done", "samples_done"}`, where `samples_done`
counts positions of the epoch order, so a run may resume on any world size or worker count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from roundhouse.errors import DataError

from ..transforms import Transform, augment_batch
from ..types import DataInfo
from .cache import ShardCache
from .index import Index, read_index
from .order import EpochPlan, Layout, epoch_order, plan_epoch
from .reader import BlockReader
from .storage import default_cache_dir, open_url

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class StreamConfig:
    """How one rank streams a split.

    Attributes:
        split: Split name in the index, e.g. `train`.
        global_batch_size: Samples per optimizer step over all ranks.
        rank: This data-parallel rank (node-major: `node_rank * ranks_per_node + local_rank`).
        world_size: Data-parallel ranks over all nodes.
        grad_accum_steps: Micro-batches per step on each rank.
        seed: Run seed; with the epoch it fixes the order.
        shuffle: Shuffle shards, blocks and rows (False: storage order).
        remainder: `drop`, `partial` or `pad` (see `order`).
        buffer_rows: Rows shuffled together (the bounded shuffle buffer; about this many
            decoded samples are held in memory per reading process).
        cache_dir: Local cache for remote shards; None: `$ROUNDHOUSE_CACHE` or ~/.cache.
        cache_limit_bytes: Cache size before least recently used shards are evicted.
        prefetch_shards: Shards downloaded ahead in the background.
        on_corrupt: `error` or `skip` a shard whose sha256 does not match.
    """

    split: str = "train"
    global_batch_size: int = 64
    rank: int = 0
    world_size: int = 1
    grad_accum_steps: int = 1
    seed: int = 0
    shuffle: bool = True
    remainder: str = "partial"
    buffer_rows: int = 16384
    cache_dir: str | None = None
    cache_limit_bytes: int = 16 << 30
    prefetch_shards: int = 2
    on_corrupt: str = "error"


class StreamingDataset(IterableDataset):
    """An `IterableDataset` of this rank's steps of one epoch of an indexed dataset.

    Args:
        url: Dataset folder (any fsspec URL) holding `index.json`.
        config: Split, batch arithmetic, shuffle and cache settings.
        storage_options: fsspec options (e.g. `endpoint_url`, `key`, `secret`).

    Raises:
        DataError: For a missing or invalid index, an unknown split, a rank outside the world,
            an unwritable cache directory, or a split too small for one step.
    """

    def __init__(
        self, url: str, config: StreamConfig, storage_options: dict[str, Any] | None = None
    ) -> None:
        if not 0 <= config.rank < config.world_size:
            raise DataError(f"rank {config.rank} is outside world size {config.world_size}")
        self.url, self.config, self.storage_options = url, config, storage_options
        self.index: Index = read_index(url, storage_options)
        if config.split not in self.index.splits:
            raise DataError(
                f"dataset {url} has no split {config.split!r}",
                f"valid splits: {', '.join(self.index.splits)}",
            )
        self.shards = self.index.split_shards(config.split)
        self.layout = Layout(tuple(s.blocks for s in self.shards))
        self.epoch, self.samples_done = 0, 0
        # Per-sample augmentation (`roundhouse.data.transforms`), seeded by (seed, epoch, row).
        self.transform: Transform | None = None
        self._reader: BlockReader | None = None
        self.build_cache()  # fails early (here, not in a worker) on an unwritable cache
        if self.plan().num_steps == 0:
            raise DataError(
                f"split {config.split!r} of {url} ({self.layout.num_rows} samples) makes no step "
                f"of global batch size {config.global_batch_size}",
                "lower data.batch_size or use another remainder policy",
            )

    @property
    def info(self) -> DataInfo:
        """Input shape, class count and split sizes, from the index (nothing downloaded)."""
        return DataInfo(
            input_shape=tuple(self.index.input.shape),
            num_classes=self.index.num_classes or 0,
            num_samples=self.index.splits,
        )

    def check_fits(self, input_shape: tuple[int, ...] | None, num_classes: int | None) -> None:
        """Checks the dataset against what a model expects.

        Raises:
            DataError: Naming the field that does not fit.
        """
        shape = tuple(self.index.input.shape)
        if input_shape is not None and tuple(input_shape) != shape:
            raise DataError(
                f"field 'input' of {self.url} has shape {list(shape)}, the model expects "
                f"{list(input_shape)}",
                "prepare the data with --image-size or pick a model for this input",
            )
        if num_classes is not None and (self.index.num_classes or 0) > num_classes:
            raise DataError(
                f"field 'target' of {self.url} has {self.index.num_classes} classes, the "
                f"model has {num_classes} outputs",
                "set model.num_classes to match the data",
            )

    def build_cache(self) -> ShardCache:
        """A shard cache for this process (download threads do not survive a fork)."""
        fs, root = open_url(self.url, self.storage_options)
        config = self.config
        return ShardCache(
            fs,
            root,
            self.url,
            cache_dir=config.cache_dir or default_cache_dir(),
            limit_bytes=config.cache_limit_bytes,
            on_corrupt=config.on_corrupt,
        )

    def order(self, epoch: int) -> np.ndarray:
        """Row numbers of `epoch` in order; depends only on (seed, epoch)."""
        config = self.config
        return epoch_order(
            self.layout,
            seed=config.seed,
            epoch=epoch,
            shuffle=config.shuffle,
            buffer_rows=config.buffer_rows,
        )

    def plan(self, samples_done: int | None = None) -> EpochPlan:
        """The remaining steps of the current epoch from `samples_done` (default: position)."""
        config = self.config
        return plan_epoch(
            self.order(self.epoch),
            samples_done=self.samples_done if samples_done is None else samples_done,
            global_batch_size=config.global_batch_size,
            world_size=config.world_size,
            grad_accum_steps=config.grad_accum_steps,
            remainder=config.remainder,
        )

    def set_position(self, epoch: int, samples_done: int) -> None:
        """Where the next iteration starts; `StreamingLoader` sets this."""
        self.epoch, self.samples_done = epoch, samples_done

    @property
    def reader(self) -> BlockReader:
        """This process's block reader, built on first use."""
        if self._reader is None:
            # Enough decoded blocks for a whole shuffle window, or every step re-reads them.
            typical = max(1, max(max(s.blocks) for s in self.shards))
            window = -(-self.config.buffer_rows // typical) + 1
            # Blocks of raw, uncompressed shards are views of the mapped files, without memory
            # of their own: keep two windows, so the steps that cross into the next window
            # evict none of its blocks (else ~20% of a 1 GB epoch's blocks are read twice).
            mapped = self.index.input.encoding == "raw" and self.index.codec == "none"
            keep = window * (2 if mapped else 1) + 1
            self._reader = BlockReader(
                self.index,
                self.shards,
                self.build_cache(),
                keep_blocks=keep,
                prefetch_shards=self.config.prefetch_shards,
            )
        return self._reader

    @property
    def corrupt_skipped(self) -> int:
        """Shards this process skipped as corrupt (with `on_corrupt: skip`)."""
        return len(self.corrupt_names)

    @property
    def corrupt_names(self) -> frozenset[str]:
        """Names of the shards this process skipped as corrupt."""
        return frozenset(self._reader.cache.corrupt) if self._reader is not None else frozenset()

    def __getstate__(self) -> dict[str, Any]:
        # The reader holds threads and open files; each worker process builds its own.
        return {**self.__dict__, "_reader": None}

    def __iter__(self) -> Iterator[list[Batch]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        plan = self.plan()
        steps = range(worker_id, plan.num_steps, num_workers)
        reader = self.reader
        reader.plan_shards(self._shard_sequence(plan, steps))
        for step in steps:
            micro = plan.micro_rows(step, self.config.rank)
            yield [self._read(reader, rows) for rows in micro]

    def _read(self, reader: BlockReader, rows: np.ndarray) -> Batch:
        if self.transform is None:
            return reader.read(rows)
        batch, kept = reader.read_with_rows(rows)
        batch["input"] = augment_batch(
            self.transform, batch["input"], kept.tolist(), seed=self.config.seed, epoch=self.epoch
        )
        return batch

    def _shard_sequence(self, plan: EpochPlan, steps: range) -> list[int]:
        """Shards in the order these steps first need them (sampled every few steps)."""
        starts, block_shard = self.layout.block_starts, self.layout.shard_of_block()
        sequence: list[int] = []
        for step in steps:
            for rows in plan.micro_rows(step, self.config.rank):
                if len(rows):
                    blocks = np.searchsorted(starts, rows[[0, -1]], side="right") - 1
                    sequence.extend(int(block_shard[b]) for b in blocks)
        return sequence


class StreamingLoader:
    """Iterates a `StreamingDataset` (through DataLoader workers if asked) and tracks position.

    The interface matches `StepLoader`: `set_epoch`, `len()` (steps of a full epoch),
    `state_dict()` / `load_state_dict()`, `last_step_size`.

    Args:
        dataset: The rank's streaming dataset.
        num_workers: DataLoader worker processes; 0 reads in this process.
    """

    def __init__(self, dataset: StreamingDataset, num_workers: int = 0) -> None:
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.num_workers = dataset, num_workers
        self.last_step_size = 0
        self.corrupt_shards: set[str] = set()  # skipped by this rank's reading processes
        self._epoch, self._steps_done, self._samples_done = 0, 0, 0
        # Where the next iteration starts: a restored position once, then the epoch's start
        # (iterating again without `set_epoch` replays the epoch, as `StepLoader` does).
        self._resume_at = (0, 0)

    def __len__(self) -> int:
        return self.dataset.plan(samples_done=0).num_steps

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch; a new epoch starts at its beginning, the restored one stays put."""
        if epoch != self._epoch:
            self._epoch, self._steps_done, self._samples_done = epoch, 0, 0
            self._resume_at = (0, 0)

    def state_dict(self) -> dict[str, int]:
        """`{"epoch", "steps_done", "samples_done"}` after the last step yielded."""
        return {
            "epoch": self._epoch,
            "steps_done": self._steps_done,
            "samples_done": self._samples_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved at any world size, worker count or batch size."""
        try:
            epoch, steps = int(state["epoch"]), int(state["steps_done"])
            samples = int(state.get("samples_done", steps * self.dataset.config.global_batch_size))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"bad streaming data state {state!r}: {err}") from err
        if min(epoch, steps, samples) < 0:
            raise DataError(f"bad streaming data state {state!r}: negative position")
        self._epoch, self._steps_done, self._samples_done = epoch, steps, samples
        self._resume_at = (steps, samples)

    def __iter__(self) -> Iterator[list[Batch]]:
        (self._steps_done, self._samples_done), self._resume_at = self._resume_at, (0, 0)
        self.dataset.set_position(self._epoch, self._samples_done)
        plan = self.dataset.plan()
        source: Any = iter(_Reported(self.dataset))
        if self.num_workers > 0:
            source = iter(
                DataLoader(
                    _Reported(self.dataset),
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                )
            )
        for step, (item, skipped) in enumerate(source):
            start, end = plan.batch.step_bounds(step)
            self._samples_done += end - start
            self._steps_done += 1
            self.last_step_size = end - start
            self.corrupt_shards.update(skipped)
            yield item

    def metrics(self) -> dict[str, float]:
        """`data/corrupt_shards_skipped`: shards this rank skipped (with `on_corrupt: skip`)."""
        return {"data/corrupt_shards_skipped": float(len(self.corrupt_shards))}


def _identity(item: Any) -> Any:
    # Module level so DataLoader workers can pickle it; items are already batches.
    return item


class _Reported(IterableDataset):
    """The dataset's steps, each paired with the shards skipped so far in the reading process.

    The reading process may be a DataLoader worker, whose counters the loader cannot see; the
    names travel back with the steps instead.
    """

    def __init__(self, dataset: StreamingDataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Iterator[tuple[list[Batch], tuple[str, ...]]]:
        for item in self.dataset:
            yield item, tuple(sorted(self.dataset.corrupt_names))
