"""The built-in `strategy` sections of the job file (an open tagged union on `kind`).

Each strategy's section lives in its own package, in a torch-free module that imports only
pydantic and `roundhouse.sections`: `parallel/single_section.py`, `parallel/ring/section.py`,
`parallel/ps/section.py` and `parallel/deepspeed/section.py`. Defining a `StrategySection`
subclass registers it; importing them here, in this order (the order of the union and of
`roundhouse schema`), makes every job file validate against the built-in kinds without
importing any strategy. These section modules are the only part of `parallel/` that config
may import (tests/unit/test_architecture.py keeps it so, and keeps them torch-free).

`auto` is no strategy but `roundhouse plan`'s choice among them at launch, so its section is
config's own.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from roundhouse.sections import StrategySection

# isort: off
# The built-in kinds in the order of the union and of the schema reference (definition order).
from roundhouse.parallel.single_section import SingleStrategyConfig
from roundhouse.parallel.ring.section import RingStrategyConfig
from roundhouse.parallel.ps.section import PSStrategyConfig, SlowWorkerConfig
from roundhouse.parallel.deepspeed.section import DeepSpeedStrategyConfig

# isort: on


class AutoStrategyConfig(StrategySection):
    """`roundhouse plan` picks the strategy at launch (see roundhouse/planner)."""

    kind: Literal["auto"]
    candidates: list[str] | None = Field(
        None,
        description="Strategy kinds to choose from (default: every registered kind with a "
        "cost model; an unknown kind is refused when the plan runs, the available ones listed).",
    )
    device: str = Field(
        "auto",
        description="Device to plan for: auto (cuda when cluster.gpus_per_worker > 0 or "
        "trainer.device is cuda, else cpu), or a known accelerator such as H100-80GB.",
    )
    bandwidth: str | None = Field(
        None, description="Link bandwidth, e.g. 25GB/s (default: measured)."
    )


__all__ = [
    "AutoStrategyConfig",
    "DeepSpeedStrategyConfig",
    "PSStrategyConfig",
    "RingStrategyConfig",
    "SingleStrategyConfig",
    "SlowWorkerConfig",
]
