"""Strategy registry: `strategy.kind` (plus a layout, where one exists) -> its class.

A strategy is one module plus one line in `STRATEGIES`. A key is the job's `strategy.kind`,
or `kind/layout` where the strategy section names a layout (`DeepSpeedStrategyConfig.layout`:
`deepspeed/pipeline` runs pipeline parallel). Launch and cluster look a strategy up here and
ask its class (`check_world_size`, `check_job`, `needs_parameter_servers`); nothing else tests
a strategy's kind.
"""

from __future__ import annotations

from typing import Any

from roundhouse.errors import JobFileError
from roundhouse.parallel.base import Strategy
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.deepspeed.pipeline import PipelineStrategy
from roundhouse.parallel.deepspeed.strategy import DeepSpeedStrategy  # imports deepspeed lazily
from roundhouse.parallel.ps.strategy import ParameterServerStrategy
from roundhouse.parallel.ring.strategy import RingStrategy
from roundhouse.parallel.single import SingleDeviceStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "single": SingleDeviceStrategy,
    "ring": RingStrategy,
    "ps": ParameterServerStrategy,
    "deepspeed": DeepSpeedStrategy,
    "deepspeed/pipeline": PipelineStrategy,
}


def strategy_key(config: Any) -> str:
    """The registry key of a `strategy` job section: its kind, or `kind/layout`."""
    layout = getattr(config, "layout", None)
    return f"{config.kind}/{layout}" if layout else config.kind


def available_kinds() -> list[str]:
    """The `strategy.kind` values this version can run, in registry order."""
    return list(dict.fromkeys(key.split("/")[0] for key in STRATEGIES))


def get_strategy_class(config: Any) -> type[Strategy]:
    """The class that runs the `strategy` section `config`.

    Raises:
        JobFileError: No strategy is registered for its kind (the available ones listed).
    """
    key = strategy_key(config)
    if key not in STRATEGIES:
        raise JobFileError(
            f"strategy.kind={config.kind!r} is not available in this version of roundhouse",
            f"available: {', '.join(available_kinds())}",
        )
    return STRATEGIES[key]


def build_strategy(config: Any, ctx: WorkerContext) -> Strategy:
    """The strategy for the job's `strategy` section on the worker `ctx`.

    Raises:
        JobFileError: An unavailable kind, or a world size the strategy cannot run on.
    """
    strategy_class = get_strategy_class(config)
    strategy_class.check_world_size(ctx.world_size)
    return strategy_class(config, ctx)


__all__ = ["STRATEGIES", "available_kinds", "build_strategy", "get_strategy_class", "strategy_key"]
