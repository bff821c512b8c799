"""`ShardSubset`: one optimizer's share of the parameter servers, when a task steps several.

Each optimizer of a task (a GAN's discriminator and generator) trains through its own `ps`
client over its own shards, so a push or pull of one optimizer's turn touches only the servers
that hold its parameters and optimizer state. Optimizer `index` of `count` gets every shard
`s` with `s % count == index` (`strategy.num_servers` must be at least `count`). Row tables
(sparse-gradient embeddings) are cut by row index over the subset's shards, as over a whole
store.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from roundhouse.parallel.ps.protocol import ParameterStore, PullReply, ServerSetup


class ShardSubset:
    """A `ParameterStore` over shards `index, index + count, ...` of another store."""

    def __init__(self, store: ParameterStore, index: int, count: int) -> None:
        self.store = store
        self.shards = [s for s in range(store.num_servers) if s % count == index]
        if not self.shards:
            raise ValueError(
                f"{store.num_servers} parameter servers cannot serve {count} optimizers"
            )

    @property
    def num_servers(self) -> int:
        """Shards in this subset."""
        return len(self.shards)

    def initialize(
        self,
        shard: int,
        setup: ServerSetup,
        indices: list[int],
        arrays: list[np.ndarray],
        state: dict[str, Any] | None,
        step: int,
    ) -> None:
        """(Re)start this subset's shard `shard` (its row-table rows are the subset's cut)."""
        setup = dataclasses.replace(setup, row_shard=shard)
        self.store.initialize(self.shards[shard], setup, indices, arrays, state, step)

    def push(
        self,
        shard: int,
        pusher: int,
        step: int,
        indices: list[int],
        flat: np.ndarray,
        present: list[bool],
        weight: int,
        pull_step: int | None = None,
    ) -> None:
        """Push to this subset's shard `shard`."""
        self.store.push(self.shards[shard], pusher, step, indices, flat, present, weight, pull_step)

    def pull(self, shards: list[int], pusher: int, step: int) -> list[PullReply]:
        """Pull this subset's `shards`."""
        return self.store.pull([self.shards[s] for s in shards], pusher, step)

    def push_rows(
        self,
        shard: int,
        pusher: int,
        step: int,
        table: int,
        rows: np.ndarray,
        values: np.ndarray,
        weight: int,
    ) -> None:
        """Push rows of a row table to this subset's shard `shard` (rows cut over the subset)."""
        self.store.push_rows(self.shards[shard], pusher, step, table, rows, values, weight)

    def pull_rows(
        self, shards: list[int], pusher: int, step: int, table: int, rows: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Pull rows of a row table from this subset's `shards`."""
        return self.store.pull_rows([self.shards[s] for s in shards], pusher, step, table, rows)

    def claim(self, epoch: int, first: int, limit: int) -> int:
        """The whole store's data counter (one per job)."""
        return self.store.claim(epoch, first, limit)

    def set_idle(self, pusher: int, idle: bool) -> None:
        """Mark the pusher idle on every shard of the store."""
        self.store.set_idle(pusher, idle)

    def state_dicts(self, shards: list[int]) -> list[dict[str, Any]]:
        """This subset's shards' states."""
        return self.store.state_dicts([self.shards[s] for s in shards])
