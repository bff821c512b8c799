"""The global sample order of an epoch and each rank's share of every step; pure functions.

Rows of a split are numbered in storage order (shard by shard, block by block). The epoch
order is a function of (seed, epoch) only:

1. the shards are permuted;
2. the blocks (Parquet row groups) inside each shard are permuted;
3. consecutive blocks are grouped into windows of at least `buffer_rows` rows (the bounded
   shuffle buffer) and the rows of each window are permuted.

Global step `s` takes positions `[s * B, (s + 1) * B)` of that order (`B`: global batch size),
so *which* samples form each global batch never depends on the world. Inside a global batch the
samples are sorted into storage order and cut with `BatchPlan` into `world_size *
grad_accum_steps` chunks: rank `r` gets chunks `r*A .. r*A+A-1`. Sorting does not change the
batch's gradient but means each rank reads about `1/world_size` of each window's blocks.

Remainder policy (the last, partial global batch):
    `drop`: dropped, so every step is full; up to `B - 1` samples are not seen this epoch.
    `partial`: kept if it has at least `world_size * grad_accum_steps` samples (as `StepLoader`
        with `drop_last=False`); every sample is seen exactly once in that case.
    `pad`: filled up to `B` with samples from the start of the epoch order; every sample is
        seen at least once and at most `B - 1` are seen twice.

Resuming at position `samples_done` continues the same order from there, at any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from roundhouse.errors import DataError

from ..sampler import SHUFFLE_STREAM, BatchPlan, derive_seed

REMAINDERS = ("drop", "partial", "pad")
# Stream tags, beside the sampler's, so shard, block and window draws never coincide.
_SHARD_STREAM, _BLOCK_STREAM, _WINDOW_STREAM = 11, 12, 13


@dataclass(frozen=True)
class Layout:
    """Blocks of one split in storage order: `shard_blocks[k]` lists shard k's block sizes."""

    shard_blocks: tuple[tuple[int, ...], ...]

    @property
    def block_rows(self) -> np.ndarray:
        """Rows of every block, in storage order."""
        return np.array([rows for blocks in self.shard_blocks for rows in blocks], dtype=np.int64)

    @property
    def block_starts(self) -> np.ndarray:
        """First row number of every block, plus the total at the end."""
        return np.concatenate([[0], np.cumsum(self.block_rows)])

    @property
    def num_rows(self) -> int:
        """Rows in the split."""
        return int(sum(sum(blocks) for blocks in self.shard_blocks))

    def shard_of_block(self) -> np.ndarray:
        """Shard position of every block."""
        return np.repeat(np.arange(len(self.shard_blocks)), [len(b) for b in self.shard_blocks])


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def epoch_blocks(layout: Layout, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Block numbers in the order the epoch visits them (shards permuted, then blocks)."""
    first = np.concatenate([[0], np.cumsum([len(b) for b in layout.shard_blocks])])
    shards = np.arange(len(layout.shard_blocks))
    if not shuffle:
        return np.arange(first[-1])
    shards = _rng(seed, epoch, SHUFFLE_STREAM, _SHARD_STREAM).permutation(shards)
    visits = []
    for shard in shards:
        count = len(layout.shard_blocks[shard])
        inner = _rng(seed, epoch, _BLOCK_STREAM, int(shard)).permutation(count)
        visits.append(first[shard] + inner)
    return np.concatenate(visits) if visits else np.zeros(0, dtype=np.int64)


def epoch_order(
    layout: Layout, *, seed: int, epoch: int, shuffle: bool, buffer_rows: int
) -> np.ndarray:
    """Row numbers of one epoch in order (int64), a function of (seed, epoch) only."""
    starts, sizes = layout.block_starts, layout.block_rows
    blocks = epoch_blocks(layout, seed=seed, epoch=epoch, shuffle=shuffle)
    rows = [np.arange(starts[b], starts[b] + sizes[b]) for b in blocks]
    if not shuffle:
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    windows, current, filled = [], [], 0
    for block_rows in rows:
        current.append(block_rows)
        filled += len(block_rows)
        if filled >= buffer_rows:
            windows.append(np.concatenate(current))
            current, filled = [], 0
    if current:
        windows.append(np.concatenate(current))
    shuffled = [
        _rng(seed, epoch, _WINDOW_STREAM, k).permutation(window) for k, window in enumerate(windows)
    ]
    return np.concatenate(shuffled) if shuffled else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class EpochPlan:
    """The steps of an epoch from `samples_done` on, for one world.

    Attributes:
        order: The remaining positions of the epoch order, padded per the remainder policy.
        batch: The `BatchPlan` cutting `order` into steps and micro-batches.
        first_step: Steps already done before `samples_done` (for numbering).
    """

    order: np.ndarray
    batch: BatchPlan
    first_step: int

    @property
    def num_steps(self) -> int:
        """Steps left in the epoch."""
        return self.batch.num_steps

    def micro_rows(self, step: int, rank: int) -> list[np.ndarray]:
        """Row numbers of `rank`'s micro-batches at (remaining) step `step`, each sorted."""
        start, end = self.batch.step_bounds(step)
        rows = np.sort(self.order[start:end])
        return [rows[lo - start : hi - start] for lo, hi in self.batch.micro_bounds(step, rank)]


def plan_epoch(
    order: np.ndarray,
    *,
    samples_done: int,
    global_batch_size: int,
    world_size: int,
    grad_accum_steps: int,
    remainder: str,
) -> EpochPlan:
    """Cuts the rest of an epoch's order (from `samples_done`) into steps for a world.

    Raises:
        DataError: For an unknown remainder policy or a position past the end of the epoch.
    """
    if remainder not in REMAINDERS:
        raise DataError(
            f"unknown remainder policy {remainder!r}", f"valid: {', '.join(REMAINDERS)}"
        )
    if not 0 <= samples_done <= len(order) + global_batch_size:
        raise DataError(f"resume position {samples_done} is outside an epoch of {len(order)}")
    rest = order[samples_done:]
    short = -len(rest) % global_batch_size
    if remainder == "pad" and short and len(order):
        rest = np.concatenate([rest, np.resize(order, short)])
    batch = BatchPlan(
        len(rest), global_batch_size, world_size, grad_accum_steps, remainder != "partial"
    )
    return EpochPlan(rest, batch, samples_done // global_batch_size)
