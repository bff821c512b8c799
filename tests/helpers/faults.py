"""Models that misbehave on purpose, for failure tests (loaded as `module.path:callable`).

Each is the same small MLP (`tests.helpers.models.SlowMLP`: it sleeps a little per training
forward, so a test can act mid-run, and otherwise trains like any MLP). The fault fires on one
rank at one training forward call, counted per process:

- `crash_once_mlp`: the process kills itself (SIGKILL, as an OOM kill would) the first time
  the fault fires in a run; a marker file written just before makes the restarted group pass.
- `stall_mlp`: the rank sleeps (practically) forever, as a hung data read or deadlock would,
  while its peers wait for it in the next collective.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tests.helpers.models import SlowMLP


def this_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class FaultyMLP(SlowMLP):
    """A `SlowMLP` that calls `fault()` on rank `rank` at training forward call `at_call`."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        delay_s: float,
        rank: int,
        at_call: int,
    ) -> None:
        super().__init__(input_shape, num_classes, delay_s)
        self.fault_rank, self.at_call, self.calls = rank, at_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at_call and this_rank() == self.fault_rank:
                self.fault()
        return super().forward(x)

    def fault(self) -> None:
        raise NotImplementedError


class CrashOnceMLP(FaultyMLP):
    def __init__(self, *args: object, marker: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.marker = Path(marker)

    def fault(self) -> None:
        if self.marker.exists():
            return
        self.marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


class StallMLP(FaultyMLP):
    def fault(self) -> None:
        time.sleep(3600)


def crash_once_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    marker: str,
    delay_s: float = 0.01,
    rank: int = 1,
    at_call: int = 15,
) -> torch.nn.Module:
    return CrashOnceMLP(input_shape, num_classes, delay_s, rank, at_call, marker=marker)


def stall_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    delay_s: float = 0.0,
    rank: int = 1,
    at_call: int = 3,
) -> torch.nn.Module:
    return StallMLP(input_shape, num_classes, delay_s, rank, at_call)
