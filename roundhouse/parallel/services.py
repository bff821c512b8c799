"""Driver-side services a strategy asks for: `ServiceSpec`, and how a worker reaches them.

A strategy that needs processes beside its workers (the parameter server's shards) returns
them from `Strategy.services(job)` as `ServiceSpec`s: a plain Python class, how many instances,
what each reserves. `roundhouse.cluster` starts them (as Ray actors) before the worker group,
without knowing what they are, and hands every worker a `ServiceGroup` per spec in
`WorkerContext.services[spec.name]`; the strategy builds its client from that group. The
protocol is the whole contract: `call` sends a method call to one instance without waiting,
`get` collects the replies (raising as soon as any call failed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ServiceSpec:
    """`count` instances of `actor_class`, instance `i` built as `actor_class(i, *args)`.

    Attributes:
        name: The service's key in `WorkerContext.services` (and its actors' name prefix).
        actor_class: A plain Python class; its public methods are what workers call.
        count: Instances to start.
        resources: What each instance reserves (`CPU`, `GPU`, custom resources).
        args: Constructor arguments after the instance index.
        max_concurrency: Calls one instance serves at once (threads; a blocking call holds one).
        env: Environment variables of each instance's process.
        ready_method: A method without arguments that answers once the instance is up.
        fix: How to fix a request the cluster cannot schedule (names the job's fields).
    """

    name: str
    actor_class: type
    count: int
    resources: dict[str, float] = field(default_factory=dict)
    args: tuple[Any, ...] = ()
    max_concurrency: int = 1
    env: dict[str, str] = field(default_factory=dict)
    ready_method: str = "ping"
    fix: str = "add resources to the cluster or ask the strategy for fewer services"

    @property
    def cpus(self) -> float:
        """CPUs all instances reserve together."""
        return self.count * float(self.resources.get("CPU", 0.0))


@runtime_checkable
class ServiceGroup(Protocol):
    """The instances of one started service, as a worker reaches them."""

    @property
    def size(self) -> int:
        """How many instances there are."""
        ...

    def call(self, index: int, method: str, *args: Any) -> Any:
        """Call `method(*args)` on instance `index` without waiting; returns a handle for
        `get`."""
        ...

    def get(self, handles: list[Any]) -> list[Any]:
        """The replies of `call` handles, in order; raises as soon as any of them failed."""
        ...


__all__ = ["ServiceGroup", "ServiceSpec"]
