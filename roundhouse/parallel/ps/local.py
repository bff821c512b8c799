"""`LocalParameterStore`: the parameter servers as objects in this process (`--local`).

The same `ShardServer` code as on Ray, called directly, so the `ps` code path can be debugged
(breakpoints, profilers) without Ray. Only for one worker: other processes cannot reach it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from roundhouse.parallel.ps.server import PullReply, ServerSetup, ShardServer


class LocalParameterStore:
    """`num_servers` in-process shards; every call runs synchronously in the caller's thread.

    `servers` may instead be given: anything with `ShardServer`'s methods called synchronously
    (the tests pass `multiprocessing` proxies of shards living in another process).
    """

    def __init__(self, num_servers: int = 1, servers: list[Any] | None = None) -> None:
        self.servers = (
            servers if servers is not None else [ShardServer(i) for i in range(num_servers)]
        )

    @property
    def num_servers(self) -> int:
        """Shards (in-process servers) in the store."""
        return len(self.servers)

    def initialize(
        self,
        shard: int,
        setup: ServerSetup,
        indices: list[int],
        arrays: list[np.ndarray],
        state: dict[str, Any] | None,
        step: int,
    ) -> None:
        """Set up shard `shard` with its parameters, optimizer state and step (`ParameterStore`)."""
        self.servers[shard].initialize(setup, indices, arrays, state, step)

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
        # In process, nothing to save: `pull` asks when it is called (and cannot wait inside
        # a push, which runs in the caller's thread).
        """Hand a pusher's gradients of `indices` to shard `shard` (`ParameterStore`)."""
        self.servers[shard].push(pusher, step, indices, flat, present, weight)

    def pull(self, shards: list[int], pusher: int, step: int) -> list[PullReply]:
        """The parameters of `shards` for `step`, once every pusher's gradients arrived."""
        return [self.servers[s].pull(pusher, step) for s in shards]

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
        """Hand a pusher's gradients of some rows of a row table to their shard."""
        self.servers[shard].push_rows(pusher, step, table, rows, values, weight)

    def pull_rows(
        self, shards: list[int], pusher: int, step: int, table: int, rows: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Rows of a row table from each of `shards`, once readable for `step`."""
        return [
            self.servers[s].pull_rows(pusher, step, table, r)
            for s, r in zip(shards, rows, strict=True)
        ]

    def claim(self, epoch: int, first: int, limit: int) -> int:
        """Claim the next chunk of the epoch's samples (dynamic data assignment)."""
        return self.servers[0].claim(epoch, first, limit)

    def set_idle(self, pusher: int, idle: bool) -> None:
        """Mark a pusher idle (done with the epoch) or active again."""
        for server in self.servers:
            server.set_idle(pusher, idle)

    def state_dicts(self, shards: list[int]) -> list[dict[str, Any]]:
        """Each of `shards`' parameters and optimizer state, for a checkpoint."""
        return [self.servers[s].state_dict() for s in shards]

    def resize(self, shard: int, pushers: list[int], world_size: int) -> int:
        """Live recovery: shard `shard` takes pushes from `pushers` now (`ShardServer.resize`)."""
        return self.servers[shard].resize(pushers, world_size)
