"""`WorkerContext`: the only way the trainer learns where it runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from roundhouse.config.topology import Topology
from roundhouse.errors import JobFileError


@dataclass(frozen=True)
class WorkerContext:
    """Topology of one worker process.

    Built by `cluster` from Ray Train's context, or by `launch` for `--local` (rank 0 of 1).
    `device` is this worker's torch device. `topology` is the job's one batch and rank layout
    at this world size, built once per worker (`trainer.build_trainer`, `with_topology`): the
    data sampler and the strategy read it. `services` holds, by name, the driver-side services
    the strategy asked for (`Strategy.services`: a `ServiceGroup` from `cluster`, or what
    `Strategy.attach_local_services` put there); empty for strategies without any.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    services: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    topology: Topology | None = field(default=None, compare=False)
    # `cluster.recovery: live`: this worker's re-formable group (`parallel.rendezvous`); None:
    # the launcher's fixed process group.
    rendezvous: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world_size, (self.rank, self.world_size)
        assert 0 <= self.local_rank < self.local_world_size, (
            self.local_rank,
            self.local_world_size,
        )
        assert 0 <= self.node_rank < self.num_nodes, (self.node_rank, self.num_nodes)

    def with_topology(self, topology: Topology) -> WorkerContext:
        """This context carrying `topology` (its world size must be this context's)."""
        assert topology.world_size == self.world_size, (topology, self.world_size)
        return dataclasses.replace(self, topology=topology)

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0."""
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; anything else is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JobFileError(
            f"trainer.device={name!r} but CUDA is not available here",
            "use trainer.device=auto or trainer.device=cpu",
        )
    return device


def build_local_context(device: str = "auto") -> WorkerContext:
    """Rank 0 of 1 on this machine: the `--local` debugging mode."""
    return WorkerContext(device=resolve_device(device))
