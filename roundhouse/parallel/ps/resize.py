"""`ResizableShard`: the part of a parameter-server shard that live recovery needs.

With `cluster.recovery: live` (sync mode) the workers re-form when one is lost or one joins,
and the shards then take pushes from a new set of pushers (`resize`). A pusher id names a
worker in one generation of the group (`pusher_tag`), so a push still on its way from before
the re-forming is recognised and ignored when it arrives. `ShardServer` inherits this.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

logger = logging.getLogger(__name__)

TAG_STRIDE = 1 << 16  # pusher ids of generation g: g * TAG_STRIDE + rank


class ServerResetError(RuntimeError):
    """The shard was re-initialized or resized while this call waited."""


def pusher_tag(generation: int, rank: int) -> int:
    """The pusher id of `rank` in generation `generation` of a live group (generation 0: the
    rank itself, as without live recovery)."""
    return generation * TAG_STRIDE + rank


class ResizableShard:
    """Live recovery's methods of `ShardServer` (it provides the state they change)."""

    cond: threading.Condition
    clocks: dict[int, int]
    pending: dict[Any, Any]
    idle: set[int]
    version: int
    generation: int
    shard_id: int
    setup: Any

    def _ready(self) -> Any:
        raise NotImplementedError

    def resize(self, pushers: list[int], world_size: int) -> int:
        """The workers re-formed (a worker was lost, or one joined): from now on `pushers`
        push, and a sync update divides by `world_size`. Returns the steps applied so far.

        Every pending (uncommitted) gradient is dropped: the workers redo that step with the
        global batch cut among `pushers`. Pusher ids name a worker *in one generation*, so a
        push still on its way from before the resize (an earlier id) is ignored when it
        arrives, and a pull waiting now fails with `ServerResetError`.
        """
        with self.cond:
            setup = self._ready()
            self.setup = dataclasses.replace(setup, num_pushers=len(pushers), world_size=world_size)
            self.pending = {}
            self.clocks = {p: self.version for p in pushers}
            self.idle = set()
            self.generation += 1
            self.cond.notify_all()
            logger.info("ps shard %d: %d pushers from step %d", self.shard_id, len(pushers),
                        self.version)  # fmt: skip
            return self.version

    def _stale_push(self, pusher: int, step: int) -> bool:
        """A push to ignore: from a pusher id of an earlier generation, or (sync) of a step
        this shard already applied (the workers redo a step that only some shards applied
        before a worker was lost; those shards keep their update)."""
        if pusher not in self.clocks:
            return True
        return self.setup.mode == "sync" and step < self.version

    def _check_pusher(self, pusher: int) -> None:
        if pusher not in self.clocks:
            raise ServerResetError(
                f"ps shard {self.shard_id}: pusher {pusher} is not in the current group"
            )
