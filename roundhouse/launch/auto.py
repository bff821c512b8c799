"""`strategy.kind: auto`: the plan's choice becomes the job's strategy before anything starts.

`resolve_auto` plans the job at the world size it will run with and replaces the `auto`
section with the recommended row's strategy (logged with its reason); the run folder's
`job.yaml` then records the concrete choice. For an elastic job (`cluster.min_workers`) it
also plans every smaller size the group may shrink to (checkpoints are strategy independent,
so a shrunken group may switch between single, ring and ZeRO layouts; a `ps` job stays `ps`,
since its servers are started once at launch); workers run the row of the size Ray gave them.
"""

from __future__ import annotations

import logging
from typing import Any

from roundhouse.config import AutoStrategyConfig, JobSpec

logger = logging.getLogger(__name__)


def plan_device(job: JobSpec, auto: AutoStrategyConfig, local: bool) -> str:
    """The device `auto` plans for: its own `device`, else where the job will run."""
    if auto.device != "auto":
        return auto.device
    wants_cuda = job.trainer.device.startswith("cuda") or (
        not local and job.cluster.gpus_per_worker > 0
    )
    if job.trainer.device == "auto" and local:
        import torch

        wants_cuda = torch.cuda.is_available()
    return "cuda" if wants_cuda else "cpu"


def choose_strategy(
    job: JobSpec, world_size: int, local: bool, kinds: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The recommended strategy section for `world_size` workers (logs the row and reason).

    Raises:
        PlanError: no strategy fits (the message says what would).
    """
    from roundhouse.planner import PlanError, build_plan
    from roundhouse.planner.devices import parse_bandwidth
    from roundhouse.planner.report import HEADER, format_row

    auto = job.strategy
    assert isinstance(auto, AutoStrategyConfig)
    kinds = kinds or (tuple(auto.candidates) if auto.candidates else None)
    bandwidth = parse_bandwidth(auto.bandwidth) if auto.bandwidth else None
    plan = build_plan(job, [world_size], plan_device(job, auto, local), bandwidth, kinds)
    if not plan.fits:
        raise PlanError(f"strategy.kind=auto: {plan.reason}", "see `roundhouse plan` for the table")
    logger.info(
        "strategy auto at %d worker(s):\n%s\n%s", world_size, HEADER, format_row(1, plan.best, plan)
    )
    logger.info("strategy auto chose %s: %s", plan.best.candidate.label, plan.reason)
    return dict(plan.best.candidate.strategy)


def is_auto(job: JobSpec) -> bool:
    """Whether the job leaves its strategy to the planner (`strategy.kind: auto`)."""
    return isinstance(job.strategy, AutoStrategyConfig)


def elastic_kinds(auto: AutoStrategyConfig, chosen: JobSpec) -> tuple[str, ...]:
    """Kinds a shrunken group may switch to: checkpoints move between the layouts of every
    strategy the registry runs without driver-side servers, but servers (ps) exist only when
    the strategy chosen at launch started them, so such a group keeps that strategy."""
    from roundhouse.parallel.registry import STRATEGIES, available_kinds, get_strategy_class

    chosen_class = get_strategy_class(chosen.strategy)
    if chosen_class.needs_parameter_servers:
        return (chosen_class.kind,)
    movable = [k for k in available_kinds() if not STRATEGIES[k].needs_parameter_servers]
    allowed = auto.candidates or movable
    return tuple(k for k in allowed if k in movable) or (chosen_class.kind,)


def resolve_auto(job: JobSpec, *, local: bool) -> tuple[JobSpec, dict[int, dict[str, Any]]]:
    """A job with `strategy.kind: auto` resolved, and the strategy per elastic world size.

    Jobs with a concrete strategy come back unchanged with an empty map.
    """
    if not isinstance(job.strategy, AutoStrategyConfig):
        return job, {}
    world_size = 1 if local else job.cluster.num_workers
    chosen = choose_strategy(job, world_size, local)
    resolved = job.with_strategy(chosen, source="strategy auto")
    by_size = {world_size: chosen}
    low = job.cluster.min_workers
    if not local and low is not None and low < world_size:
        kinds = elastic_kinds(job.strategy, resolved)
        for size in range(low, world_size):
            by_size[size] = choose_strategy(job, size, local, kinds=kinds)
    return resolved, by_size
