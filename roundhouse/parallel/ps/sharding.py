"""Size-balanced sharding of a model's parameters over parameter servers."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def build_layout(numels: list[int], num_shards: int) -> list[list[int]]:
    """Assign parameter indices to `num_shards` shards with balanced element counts.

    Greedy: the largest parameter first, each to the least loaded shard (ties: the lowest
    shard). Deterministic, so every worker computes the same layout. Each shard's indices are
    sorted. With more shards than parameters the extra shards stay empty.

    Returns:
        `layout[s]`: the global parameter indices held by shard `s`.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    loads = [0] * num_shards
    layout: list[list[int]] = [[] for _ in range(num_shards)]
    for index in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        shard = min(range(num_shards), key=lambda s: (loads[s], s))
        layout[shard].append(index)
        loads[shard] += numels[index]
    for shard in layout:
        shard.sort()
    if num_shards > len(numels):
        logger.warning(
            "%d parameter servers for %d parameters: some stay idle", num_shards, len(numels)
        )
    return layout


def shard_of(layout: list[list[int]]) -> dict[int, int]:
    """Global parameter index -> its shard."""
    return {g: s for s, indices in enumerate(layout) for g in indices}


def used_shards(layout: list[list[int]]) -> list[int]:
    """The shards that hold at least one parameter."""
    return [s for s, indices in enumerate(layout) if indices]
