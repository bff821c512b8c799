"""Strategy registry: `strategy.kind` (plus a layout, where one exists) -> its class.

A strategy is one module plus one line in `STRATEGIES`. A key is the job's `strategy.kind`,
or `kind/layout` where the strategy section names a layout (`DeepSpeedStrategyConfig.layout`:
`deepspeed/pipeline` runs pipeline parallel). Launch and cluster look a strategy up here and
ask its class (`check_world_size`, `check_job`, `services`), and the planner
asks its `cost_model` (`cost_models`); nothing else tests a strategy's kind.
"""

from __future__ import annotations

from typing import Any

from roundhouse.config.strategy_section import strategy_sections
from roundhouse.errors import JobFileError
from roundhouse.parallel.base import Strategy
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.costs import CostModel
from roundhouse.parallel.deepspeed.pipeline import PipelineStrategy
from roundhouse.parallel.deepspeed.strategy import DeepSpeedStrategy  # imports deepspeed lazily
from roundhouse.parallel.ps.strategy import ParameterServerStrategy
from roundhouse.parallel.ring.strategy import RingStrategy
from roundhouse.parallel.single import SingleDeviceStrategy

# The one-device strategy: the parity reference, and the loop calibration's baseline.
REFERENCE_SECTION: dict[str, Any] = {"kind": "single"}

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


def strategy_class_for(strategy: dict[str, Any]) -> type[Strategy]:
    """The class that runs a `strategy` section given as a job file's dict (validated)."""
    return get_strategy_class(strategy_sections()[strategy["kind"]].model_validate(strategy))


def build_strategy(config: Any, ctx: WorkerContext) -> Strategy:
    """The strategy for the job's `strategy` section on the worker `ctx`.

    Raises:
        JobFileError: An unavailable kind, or a world size the strategy cannot run on.
    """
    strategy_class = get_strategy_class(config)
    strategy_class.check_world_size(ctx.world_size)
    return strategy_class(config, ctx)


def check_kinds(kinds: tuple[str, ...] | None) -> None:
    """Raise `JobFileError` when `kinds` (plan's `--strategies`, auto's `candidates`) names a
    kind this version cannot run."""
    unknown = [k for k in kinds or () if k not in available_kinds()]
    if unknown:
        raise JobFileError(
            f"unknown strategy kind(s) {', '.join(map(repr, unknown))}",
            f"available: {', '.join(available_kinds())}",
        )


def cost_models(kinds: tuple[str, ...] | None = None) -> list[CostModel]:
    """The cost model of every registered strategy that has one, in registry order, each
    once per kind (a kind's layouts share it), limited to `kinds` where given."""
    check_kinds(kinds)
    seen: dict[tuple[str, type[CostModel]], CostModel] = {}
    for key, strategy_class in STRATEGIES.items():
        kind, model = key.split("/")[0], strategy_class.cost_model
        if model is not None and (kinds is None or kind in kinds):
            seen.setdefault((kind, model), model(kind))
    return list(seen.values())


def cost_model_for(strategy: dict[str, Any]) -> CostModel:
    """The cost model that prices the `strategy` section `strategy` (a job file's dict).

    Raises:
        JobFileError: Its kind is not available, or has no cost model.
    """
    found = cost_models((strategy["kind"],))
    if not found:
        raise JobFileError(
            f"strategy.kind={strategy['kind']!r} has no cost model, so it cannot be planned",
            "give its Strategy class a cost_model (see roundhouse/parallel/costs)",
        )
    return found[0]


def reference_allowed(kinds: tuple[str, ...] | None) -> bool:
    """Whether the one-device reference strategy is among `kinds` (None: every kind)."""
    return kinds is None or REFERENCE_SECTION["kind"] in kinds


__all__ = [
    "REFERENCE_SECTION",
    "STRATEGIES",
    "available_kinds",
    "build_strategy",
    "check_kinds",
    "cost_model_for",
    "cost_models",
    "get_strategy_class",
    "reference_allowed",
    "strategy_class_for",
    "strategy_key",
]
