"""Driver-side services on Ray: whatever `ServiceSpec`s the job's strategy asks for.

The driver starts each spec's instances as Ray actors (`ray.remote(spec.actor_class)`, each
reserving `spec.resources`, threaded to `spec.max_concurrency`) before the worker group,
waits until every one answers `spec.ready_method`, and passes their handles to the workers
through `train_loop_config`. Each worker wraps them into a `RayServiceGroup` per spec, in
`WorkerContext.services[spec.name]`. This module knows nothing of what a service does.

Failures: an actor is created with `max_restarts=-1`, so when its process dies Ray starts a
fresh one behind the same handle; the strategy's client decides what a failed call means (the
parameter server's fails the worker group, which resumes from the latest checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from roundhouse.cluster.runtime import ClusterError
from roundhouse.config import JobSpec
from roundhouse.parallel.registry import get_strategy_class
from roundhouse.parallel.services import ServiceSpec

logger = logging.getLogger(__name__)

CONFIG_KEY = "services"


def job_services(job: JobSpec) -> list[ServiceSpec]:
    """The services the job's strategy asks for (none for most strategies)."""
    return get_strategy_class(job.strategy).services(job)


def service_cpus(job: JobSpec) -> float:
    """CPUs the job's services reserve (0 for strategies without services)."""
    return get_strategy_class(job.strategy).service_cpus(job)


def service_name(job: JobSpec, spec: ServiceSpec, index: int) -> str:
    """The actor name of one instance (lets tools and tests find it with `ray.get_actor`)."""
    return f"roundhouse-{spec.name}-{job.name}-{job.storage.run_id}-{index}"


def actor_options(job: JobSpec, spec: ServiceSpec, index: int) -> dict[str, Any]:
    """`num_cpus`/`num_gpus`/`resources` from `spec.resources`, concurrency, restart policy."""
    resources = dict(spec.resources)
    options: dict[str, Any] = {
        "num_cpus": resources.pop("CPU", 0.0),
        "num_gpus": resources.pop("GPU", 0.0),
        "max_concurrency": spec.max_concurrency,
        "max_restarts": -1,  # a dead instance comes back empty; its client decides what then
        "name": service_name(job, spec, index),
    }
    if spec.env:
        options["runtime_env"] = {"env_vars": dict(spec.env)}
    if resources:
        options["resources"] = resources
    return options


def start_services(job: JobSpec) -> dict[str, list[Any]]:
    """Start the job's services and wait until they answer (`cluster.schedule_timeout_s`).

    Returns:
        Actor handles by service name; empty for a strategy without services.

    Raises:
        ClusterError: The instances could not be scheduled in time (the spec's fix named).
    """
    started: dict[str, list[Any]] = {}
    try:
        for spec in job_services(job):
            started[spec.name] = start_one(job, spec)
    except BaseException:
        stop_services(started)
        raise
    return started


def start_one(job: JobSpec, spec: ServiceSpec) -> list[Any]:
    """Start the instances of one spec and wait until each answers its `ready_method`."""
    import ray

    actor_class = ray.remote(spec.actor_class)
    handles = [
        actor_class.options(**actor_options(job, spec, i)).remote(i, *spec.args)
        for i in range(spec.count)
    ]
    timeout = job.cluster.schedule_timeout_s
    try:
        ray.get([getattr(h, spec.ready_method).remote() for h in handles], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        stop_services({spec.name: handles})
        raise ClusterError(
            f"{spec.count} {spec.name} service instance(s) x {spec.resources} could not be "
            f"scheduled within cluster.schedule_timeout_s={timeout:g} s",
            spec.fix,
        ) from None
    logger.info(
        "started %d %s service instance(s) (%s each)", spec.count, spec.name, spec.resources
    )
    return handles


def stop_services(started: dict[str, list[Any]]) -> None:
    """Kill every service actor (no restart)."""
    import ray

    for handles in started.values():
        for handle in handles:
            ray.kill(handle, no_restart=True)


@contextlib.contextmanager
def services_stopped_at_exit(started: dict[str, list[Any]]) -> Iterator[None]:
    """Stop the service actors when the block ends, however it ends."""
    try:
        yield
    finally:
        stop_services(started)


def attach_services(ctx: Any, config: dict[str, Any]) -> Any:
    """`ctx` with a `RayServiceGroup` per started service in `config` (unchanged if none)."""
    started = config.get(CONFIG_KEY) or {}
    if not started:
        return ctx
    groups = {name: RayServiceGroup(handles) for name, handles in started.items()}
    return dataclasses.replace(ctx, services={**ctx.services, **groups})


class RayServiceGroup:
    """`ServiceGroup` over Ray actor handles: a call is a Ray task, `get` collects them."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = list(handles)

    @property
    def size(self) -> int:
        """Instances (actors) in the group."""
        return len(self.handles)

    def call(self, index: int, method: str, *args: Any) -> Any:
        """`method(*args)` on actor `index`, not waited for: its object reference."""
        return getattr(self.handles[index], method).remote(*args)

    def get(self, handles: list[Any]) -> list[Any]:
        """`ray.get(handles)`, but raising as soon as any of them fails.

        `ray.get` of a list waits for every result first; a pull waiting (on its shard) for a
        push that failed would then hold the error back until the pull's own timeout.
        """
        import ray

        results: dict[Any, Any] = {}
        pending = list(handles)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[ready[0]] = ray.get(ready[0])  # raises the call's error
        return [results[ref] for ref in handles]
