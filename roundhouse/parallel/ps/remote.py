"""The parameter servers as a driver-side service: their `ServiceSpec`, and the store over them.

`server_spec(job)` asks `roundhouse.cluster` for `strategy.num_servers` `ShardServer`
instances (each reserving `strategy.server_resources`, many calls at once: a waiting pull holds a
thread, pushes must still get through). Every worker then finds them, started, in
`WorkerContext.services["ps"]` (a `ServiceGroup`) and wraps them in a `RemoteParameterStore`.
Dense gradients and parameters travel over one TCP connection per shard (`ps/wire.py`: raw
float32 bytes, no pickling, no object store); control calls (initialize, checkpoints, claims,
idle marks) and row tables are service calls.

Failures: the cluster restarts a dead instance empty behind the same handle. The workers'
calls to it raise (a socket to it closes at once: `WireClosedError`, a `ConnectionError`),
so the worker group fails and is restarted; the restarted group resumes from
the run's latest checkpoint, and its rank 0 re-initializes every shard from it before anyone
pulls. A call reaching a restarted, not yet initialized shard fails too
(`ServerNotReadyError`), never trains on garbage.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from roundhouse.config import JobSpec
from roundhouse.parallel.ps.server import (
    PullReply,
    ServerNotReadyError,
    ServerResetError,
    ServerSetup,
    ShardServer,
)
from roundhouse.parallel.ps.wire import WireClosedError, WireConnection
from roundhouse.parallel.services import ServiceGroup, ServiceSpec

SERVICE = "ps"  # the key of the servers in `WorkerContext.services`
logger = logging.getLogger(__name__)
# A shard's failures that a worker re-raises as themselves (`ps/wire.py` sends them by name).
SERVER_ERRORS: dict[str, type] = {
    e.__name__: e
    for e in (ServerNotReadyError, ServerResetError, TimeoutError, ValueError, AssertionError)
}
MAX_CONCURRENCY = 64  # waiting pulls hold a thread each; pushes must still get through


def server_spec(job: JobSpec) -> ServiceSpec:
    """The job's shard servers: `strategy.num_servers` x `strategy.server_resources`."""
    threads = max(1, int(job.strategy.server_resources.get("CPU", 1.0)))
    return ServiceSpec(
        name=SERVICE,
        actor_class=ShardServer,
        count=job.strategy.num_servers,
        resources=dict(job.strategy.server_resources),
        args=(threads,),
        max_concurrency=MAX_CONCURRENCY,
        env={"OMP_NUM_THREADS": "1"},
        fix="lower strategy.num_servers or strategy.server_resources, or add resources",
    )


class RemoteParameterStore:
    """`ParameterStore` over the started servers.

    Dense pushes and pulls travel over one `WireConnection` per shard (its address asked once
    through a service call; `ps/wire.py`); everything else is a service call. A push returns
    once its bytes are sent; its acknowledgement (or failure) is read by the next pull of that
    shard, which reads every earlier reply of the connection first. A shard whose listener
    cannot be reached (say a firewall between nodes) is served by service calls instead.
    """

    def __init__(self, group: ServiceGroup) -> None:
        self.group = group
        self.links: dict[int, WireConnection | None] = {}  # None: this shard over service calls
        self.expected: dict[int, list[int | None]] = {}  # per shard: unread replies, in order
        self.lock = threading.Lock()
        self.in_flight: list[Any] = []  # service-call fallback: pushes not yet collected
        self.asked: dict[tuple[int, int], Any] = {}  # fallback: (shard, step) -> a push's pull

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

    def _link(self, shard: int) -> WireConnection | None:
        """The shard's connection (made on first use), or None where it cannot be reached."""
        with self.lock:
            if shard not in self.links:
                address = self.group.get([self.group.call(shard, "wire_address")])[0]
                try:
                    self.links[shard] = WireConnection(address, SERVER_ERRORS)
                except ConnectionError as error:
                    logger.warning("ps shard %d over service calls (no socket: %s)", shard, error)
                    self.links[shard] = None
                self.expected[shard] = []
            return self.links[shard]

    def _drop(self, shard: int) -> None:
        """Forget a broken connection (the next call reconnects, to a restarted server too)."""
        with self.lock:
            link = self.links.pop(shard, None)
            self.expected.pop(shard, None)
        if link is not None:
            link.close()

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
        link = self._link(shard)
        if link is None:
            self._call_push(shard, (pusher, step, indices, flat, present, weight, pull_step))
            return
        try:
            link.send_push(pusher, step, indices, flat, present, weight, pull_step)
        except WireClosedError:
            self._drop(shard)
            raise
        self.expected[shard].append(pull_step)

    def pull(self, shards: list[int], pusher: int, step: int) -> list[PullReply]:
        """The parameters of `shards` for `step`; raises as soon as any push or pull failed."""
        links = {s: self._link(s) for s in shards}
        for s, link in links.items():  # ask every shard first: they answer in parallel
            if link is not None and step not in self.expected[s]:
                self._send_pull(s, link, pusher, step)
        called = self._call_pulls([s for s in shards if links[s] is None], pusher, step)
        return [self._read_pull(s, links[s], step) if links[s] else called[s] for s in shards]

    def _send_pull(self, shard: int, link: WireConnection, pusher: int, step: int) -> None:
        try:
            link.send_pull(pusher, step)
        except WireClosedError:
            self._drop(shard)
            raise
        self.expected[shard].append(step)

    def _read_pull(self, shard: int, link: WireConnection, step: int) -> PullReply:
        """Read the shard's replies up to the pull for `step`: acknowledgements (raising any
        push's failure), stale pulls of another step (dropped: a re-initialization), then it."""
        expected = self.expected[shard]
        try:
            while expected:
                want = expected.pop(0)
                try:
                    reply = link.read_reply()
                except WireClosedError:
                    raise
                except Exception:
                    if want is None or want == step:
                        raise
                    continue  # a stale pull failed (the shard was re-initialized): as asked
                if want == step:
                    return PullReply(
                        reply.flat, reply.version, reply.lr, reply.grad_sq_norm, reply.ahead
                    )
        except WireClosedError:
            self._drop(shard)
            raise
        raise AssertionError(f"no pull of step {step} was sent to shard {shard}")

    def _call_push(self, shard: int, args: tuple) -> None:
        """The service-call fallback of `push`."""
        handle = self.group.call(shard, "push", *args)
        if args[-1] is None:
            self.in_flight.append(handle)
        else:  # its reply is the next pull's (`pull` collects it, and so any failure)
            self.asked[(shard, args[-1])] = handle

    def _call_pulls(self, shards: list[int], pusher: int, step: int) -> dict[int, PullReply]:
        """The service-call fallback of `pull` (with every fallback push's outcome)."""
        asked, self.asked = self.asked, {}  # any for other steps are stale (a re-initialization)
        pulls = [
            asked.pop((s, step), None) or self.group.call(s, "pull", pusher, step) for s in shards
        ]
        pushes, self.in_flight = self.in_flight, []
        return dict(zip(shards, self.group.get(pushes + pulls)[len(pushes) :], strict=True))

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
