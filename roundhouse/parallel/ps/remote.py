"""The parameter servers as a driver-side service: their `ServiceSpec`, and the store over them.

`server_spec(job)` asks `roundhouse.cluster` for `strategy.num_servers` `ShardServer`
instances (each reserving `cluster.ps_resources`, many calls at once: a waiting pull holds a
thread, pushes must still get through). Every worker then finds them, started, in
`WorkerContext.services["ps"]` (a `ServiceGroup`) and wraps them in a `RemoteParameterStore`.
Gradients and parameters travel as numpy arrays.

Failures: the cluster restarts a dead instance empty behind the same handle. The workers'
calls to it raise, so the worker group fails and is restarted; the restarted group resumes from
the run's latest checkpoint, and its rank 0 re-initializes every shard from it before anyone
pulls. A call reaching a restarted, not yet initialized shard fails too
(`ServerNotReadyError`), never trains on garbage.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from roundhouse.config import JobSpec
from roundhouse.parallel.ps.server import PullReply, ServerSetup, ShardServer
from roundhouse.parallel.services import ServiceGroup, ServiceSpec

SERVICE = "ps"  # the key of the servers in `WorkerContext.services`
MAX_CONCURRENCY = 64  # waiting pulls hold a thread each; pushes must still get through


def server_spec(job: JobSpec) -> ServiceSpec:
    """The job's shard servers: `strategy.num_servers` x `cluster.ps_resources`."""
    threads = max(1, int(job.cluster.ps_resources.get("CPU", 1.0)))
    return ServiceSpec(
        name=SERVICE,
        actor_class=ShardServer,
        count=job.strategy.num_servers,
        resources=dict(job.cluster.ps_resources),
        args=(threads,),
        max_concurrency=MAX_CONCURRENCY,
        env={"OMP_NUM_THREADS": "1"},
        fix="lower strategy.num_servers or cluster.ps_resources, or add resources",
    )


class RemoteParameterStore:
    """`ParameterStore` over the started servers; pushes are fire-and-forget until the next
    pull, which collects their outcome."""

    def __init__(self, group: ServiceGroup) -> None:
        self.group = group
        self.in_flight: list[Any] = []
        self.asked: dict[tuple[int, int], Any] = {}  # (shard, step) -> a push-and-pull's reply

    @property
    def num_servers(self) -> int:
        """Shards (server instances) in the store."""
        return self.group.size

    def initialize(
        self,
        shard: int,
        setup: ServerSetup,
        indices: list[int],
        arrays: list[np.ndarray],
        state: dict[str, Any] | None,
        step: int,
    ) -> None:
        """Set up shard `shard` with its parameters, optimizer state and step; waits for it."""
        self.group.get([self.group.call(shard, "initialize", setup, indices, arrays, state, step)])

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
        """Send gradients to a shard without waiting (`pull` collects the outcome)."""
        args = (pusher, step, indices, flat, present, weight, pull_step)
        handle = self.group.call(shard, "push", *args)
        if pull_step is None:
            self.in_flight.append(handle)
        else:  # its reply is the next pull's (`pull` collects it, and so any failure)
            self.asked[(shard, pull_step)] = handle

    def pull(self, shards: list[int], pusher: int, step: int) -> list[PullReply]:
        """The parameters of `shards` for `step`; raises as soon as any push or pull failed."""
        asked, self.asked = self.asked, {}  # any for other steps are stale (a re-initialization)
        pulls = [asked.pop((s, step), None) for s in shards]
        pulls = [
            handle if handle is not None else self.group.call(s, "pull", pusher, step)
            for s, handle in zip(shards, pulls, strict=True)
        ]
        pushes, self.in_flight = self.in_flight, []
        return self.group.get(pushes + pulls)[len(pushes) :]

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
        """Send gradients of some rows of a row table to their shard; waits for it."""
        args = (pusher, step, table, rows, values, weight)
        self.group.get([self.group.call(shard, "push_rows", *args)])

    def pull_rows(
        self, shards: list[int], pusher: int, step: int, table: int, rows: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Rows of a row table from each of `shards` for `step` (in parallel)."""
        calls = [
            self.group.call(s, "pull_rows", pusher, step, table, r)
            for s, r in zip(shards, rows, strict=True)
        ]
        return self.group.get(calls)

    def claim(self, epoch: int, first: int, limit: int) -> int:
        """Claim the next chunk of the epoch's samples from shard 0 (dynamic data assignment)."""
        return self.group.get([self.group.call(0, "claim", epoch, first, limit)])[0]

    def set_idle(self, pusher: int, idle: bool) -> None:
        """Mark a pusher idle or active on every shard."""
        self.group.get([self.group.call(s, "set_idle", pusher, idle) for s in self.shards])

    def state_dicts(self, shards: list[int]) -> list[dict[str, Any]]:
        """Each of `shards`' parameters and optimizer state, for a checkpoint."""
        return self.group.get([self.group.call(s, "state_dict") for s in shards])

    @property
    def shards(self) -> range:
        """Every shard's index."""
        return range(self.group.size)

    def resize(self, shard: int, pushers: list[int], world_size: int) -> int:
        """Live recovery: shard `shard` takes pushes from `pushers` now (`ShardServer.resize`)."""
        return self.group.get([self.group.call(shard, "resize", pushers, world_size)])[0]
