"""`ParameterStore`: how the `ps` strategy talks to its parameter servers.

`roundhouse.parallel.ps.remote.RemoteParameterStore` implements it over the servers the
cluster started (`Strategy.services`); `LocalParameterStore`
(in `roundhouse.parallel.ps.local`) with `ShardServer` objects in this process. The strategy
never knows which one it has.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from roundhouse.parallel.ps.server import PullReply, ServerSetup


@runtime_checkable
class ParameterStore(Protocol):
    """A set of parameter-server shards, addressed by shard number."""

    @property
    def num_servers(self) -> int:
        """How many shards (servers) there are."""
        ...

    def initialize(
        self,
        shard: int,
        setup: ServerSetup,
        indices: list[int],
        arrays: list[np.ndarray],
        state: dict[str, Any] | None,
        step: int,
    ) -> None:
        """(Re)start one shard with its parameters (and optimizer state); blocks until done."""
        ...

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
        """Send gradient sums to one shard; may return before the shard received them.

        `pull_step`: this pusher's next `pull` of this shard will be for `pull_step`; a store
        may send that request with this push (`ShardServer.push`), saving a round trip.
        """
        ...

    def pull(self, shards: list[int], pusher: int, step: int) -> list[PullReply]:
        """The parameters of `shards` (in parallel), per `ShardServer.pull`'s waiting rule.

        Also waits for (and re-raises a failure of) every push sent so far; a pull need not
        wait for the pushes before it is sent, the shards wait for them. Shards already asked
        through a push's `pull_step` are not asked again.
        """
        ...

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
        """Send the gradient sums of some rows of a row table to the shard holding them
        (`ShardServer.push_rows`); blocks until the shard has them."""
        ...

    def pull_rows(
        self, shards: list[int], pusher: int, step: int, table: int, rows: list[np.ndarray]
    ) -> list[np.ndarray]:
        """`rows[i]`'s values of row table `table` from `shards[i]` (in parallel), per
        `ShardServer.pull_rows`'s waiting rule."""
        ...

    def claim(self, epoch: int, first: int, limit: int) -> int:
        """Dynamic data assignment: shard 0's `ShardServer.claim`."""
        ...

    def set_idle(self, pusher: int, idle: bool) -> None:
        """`ShardServer.set_idle` on every shard; blocks until done."""
        ...

    def state_dicts(self, shards: list[int]) -> list[dict[str, Any]]:
        """Each shard's `ShardServer.state_dict()`."""
        ...

    def resize(self, shard: int, pushers: list[int], world_size: int) -> int:
        """Live recovery: `ShardServer.resize` on one shard; its steps applied so far."""
        ...
