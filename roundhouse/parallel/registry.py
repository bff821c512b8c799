"""Strategy registry: `strategy.kind` -> the class that implements it.

Only the strategies listed here can run. `ring`, `ps` and `deepspeed` are part of the job schema
already (so job files need no redesign) and arrive with their own issues.
"""

from __future__ import annotations

from roundhouse.errors import JobFileError
from roundhouse.parallel.base import StepStats, Strategy, TrainPlan
from roundhouse.parallel.deepspeed.strategy import DeepSpeedStrategy  # imports deepspeed lazily
from roundhouse.parallel.ps.strategy import ParameterServerStrategy
from roundhouse.parallel.ring.strategy import RingStrategy
from roundhouse.parallel.single import SingleDeviceStrategy
from roundhouse.trainer.context import WorkerContext

STRATEGIES: dict[str, type[Strategy]] = {
    "single": SingleDeviceStrategy,
    "ring": RingStrategy,
    "ps": ParameterServerStrategy,
    "deepspeed": DeepSpeedStrategy,
}


def build_strategy(config, ctx: WorkerContext) -> Strategy:
    """The strategy for `strategy.kind`; a kind not implemented yet is a clear error."""
    kind = config.kind
    if kind not in STRATEGIES:
        raise JobFileError(
            f"strategy.kind={kind!r} is not available in this version of roundhouse",
            f"available: {', '.join(STRATEGIES)}",
        )
    if kind == "single" and ctx.world_size != 1:
        raise JobFileError(
            f"strategy.kind=single runs on one worker, but the job has {ctx.world_size}",
            "run with --local or set cluster.num_workers=1",
        )
    return STRATEGIES[kind](config, ctx)


__all__ = ["STRATEGIES", "StepStats", "Strategy", "TrainPlan", "build_strategy"]
