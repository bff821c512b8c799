"""Parameter-server actors on Ray, and the `ParameterStore` the `ps` strategy uses to reach them.

The driver starts `strategy.num_servers` actors (each a threaded actor running
`roundhouse.parallel.ps.ShardServer`, reserving `cluster.ps_resources`) before the worker group,
and passes their handles to the workers through `train_loop_config`. Each worker wraps them
into a `RayParameterStore` and puts it in its `WorkerContext`. Gradients and parameters travel
through Ray's object store as numpy arrays (zero-copy reads on the receiving side).

Failures: a server actor is created with `max_restarts`, so when its process dies Ray starts
a fresh (empty) one behind the same handle. The workers' calls to the dead actor raise, so
the worker group fails and Ray Train restarts it (under `cluster.max_failures`); the restarted
group resumes from the run's latest checkpoint, and its rank 0 re-initializes every shard from
that checkpoint (parameters, optimizer state, schedule) before anyone pulls. A call reaching a
restarted, not yet initialized shard fails too (`ServerNotReadyError`), never trains on
garbage.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from roundhouse.cluster.runtime import ClusterError
from roundhouse.config import JobSpec
from roundhouse.parallel.ps import PullReply, ServerSetup, ShardServer
from roundhouse.parallel.registry import get_strategy_class

logger = logging.getLogger(__name__)

CONFIG_KEY = "ps_servers"
MAX_CONCURRENCY = 64  # waiting pulls hold a thread each; pushes must still get through


def server_cpus(job: JobSpec) -> float:
    """CPUs the job's parameter servers reserve (0 for strategies without servers)."""
    return get_strategy_class(job.strategy).parameter_server_cpus(job)


def server_name(job: JobSpec, shard: int) -> str:
    """The actor name of one shard (lets tools and tests find it with `ray.get_actor`)."""
    return f"roundhouse-ps-{job.name}-{job.storage.run_id}-{shard}"


def actor_options(job: JobSpec, shard: int) -> dict[str, Any]:
    """`num_cpus`/`num_gpus`/`resources` from `cluster.ps_resources`, plus restart policy."""
    resources = dict(job.cluster.ps_resources)
    options: dict[str, Any] = {
        "num_cpus": resources.pop("CPU", 0.0),
        "num_gpus": resources.pop("GPU", 0.0),
        "max_concurrency": MAX_CONCURRENCY,
        "max_restarts": -1,  # a dead server comes back empty; the job's restart refills it
        "name": server_name(job, shard),
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}},
    }
    if resources:
        options["resources"] = resources
    return options


def start_servers(job: JobSpec) -> list[Any]:
    """Start the job's server actors and wait until they run (`cluster.schedule_timeout_s`).

    Returns no handles for a job whose strategy does not need parameter servers.
    """
    import ray

    if not get_strategy_class(job.strategy).needs_parameter_servers:
        return []

    actor_class = ray.remote(ShardServer)
    threads = max(1, int(job.cluster.ps_resources.get("CPU", 1.0)))
    handles = [
        actor_class.options(**actor_options(job, shard)).remote(shard, threads)
        for shard in range(job.strategy.num_servers)
    ]
    try:
        ray.get([h.ping.remote() for h in handles], timeout=job.cluster.schedule_timeout_s)
    except ray.exceptions.GetTimeoutError:
        stop_servers(handles)
        raise ClusterError(
            f"{len(handles)} parameter servers x {dict(job.cluster.ps_resources)} could not be "
            f"scheduled within cluster.schedule_timeout_s={job.cluster.schedule_timeout_s:g} s",
            "lower strategy.num_servers or cluster.ps_resources, or add resources",
        ) from None
    logger.info("started %d parameter servers (%s each)", len(handles), job.cluster.ps_resources)
    return handles


def stop_servers(handles: list[Any]) -> None:
    """Kill the server actors (no restart)."""
    import ray

    for handle in handles:
        ray.kill(handle, no_restart=True)


@contextlib.contextmanager
def servers_stopped_at_exit(handles: list[Any]) -> Iterator[None]:
    """Stop the server actors when the block ends, however it ends."""
    try:
        yield
    finally:
        stop_servers(handles)


def attach_parameter_store(ctx: Any, config: dict[str, Any]) -> Any:
    """`ctx` with a `RayParameterStore` over the servers in `config` (unchanged if none)."""
    import dataclasses

    handles = config.get(CONFIG_KEY)
    if not handles:
        return ctx
    return dataclasses.replace(ctx, parameter_store=RayParameterStore(handles))


class RayParameterStore:
    """`ParameterStore` over Ray actor handles; pushes are fire-and-forget until the next pull."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = list(handles)
        self.in_flight: list[Any] = []
        self.asked: dict[tuple[int, int], Any] = {}  # (shard, step) -> a push-and-pull's reply

    @property
    def num_servers(self) -> int:
        """Shards (server actors) in the store."""
        return len(self.handles)

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
        import ray

        ray.get(self.handles[shard].initialize.remote(setup, indices, arrays, state, step))

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
        handle = self.handles[shard]
        ref = handle.push.remote(pusher, step, indices, flat, present, weight, pull_step)
        if pull_step is None:
            self.in_flight.append(ref)
        else:  # its reply is the next pull's (`pull` collects it, and so any failure)
            self.asked[(shard, pull_step)] = ref

    def pull(self, shards: list[int], pusher: int, step: int) -> list[PullReply]:
        """The parameters of `shards` for `step`; raises as soon as any push or pull failed."""
        asked, self.asked = self.asked, {}  # any for other steps are stale (a re-initialization)
        pulls = [asked.pop((s, step), None) for s in shards]
        pulls = [
            ref if ref is not None else self.handles[s].pull.remote(pusher, step)
            for s, ref in zip(shards, pulls, strict=True)
        ]
        pushes, self.in_flight = self.in_flight, []
        return _get_all(pushes + pulls)[len(pushes) :]

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
        import ray

        handle = self.handles[shard]
        ray.get(handle.push_rows.remote(pusher, step, table, rows, values, weight))

    def pull_rows(
        self, shards: list[int], pusher: int, step: int, table: int, rows: list[np.ndarray]
    ) -> list[np.ndarray]:
        """Rows of a row table from each of `shards` for `step` (in parallel)."""
        refs = [
            self.handles[s].pull_rows.remote(pusher, step, table, r)
            for s, r in zip(shards, rows, strict=True)
        ]
        return _get_all(refs)

    def claim(self, epoch: int, first: int, limit: int) -> int:
        """Claim the next chunk of the epoch's samples from shard 0 (dynamic data assignment)."""
        import ray

        return ray.get(self.handles[0].claim.remote(epoch, first, limit))

    def set_idle(self, pusher: int, idle: bool) -> None:
        """Mark a pusher idle or active on every shard."""
        import ray

        ray.get([h.set_idle.remote(pusher, idle) for h in self.handles])

    def state_dicts(self, shards: list[int]) -> list[dict[str, Any]]:
        """Each of `shards`' parameters and optimizer state, for a checkpoint."""
        import ray

        return ray.get([self.handles[s].state_dict.remote() for s in shards])


def _get_all(refs: list[Any]) -> list[Any]:
    """`ray.get(refs)`, but raising as soon as any of them fails.

    `ray.get` of a list waits for every result first; a pull waiting (on its shard) for a push
    that failed would then hold the error back until the pull's own timeout.
    """
    import ray

    results: dict[Any, Any] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results[ready[0]] = ray.get(ready[0])  # raises the call's error
    return [results[ref] for ref in refs]
