"""`roundhouse plan`: predict per-rank memory and step time of every strategy before launch.

Arithmetic over the strategy registry: every registered strategy's cost model
(`Strategy.cost_model`, see `roundhouse.parallel.costs`) offers and prices its rows; this
package enumerates them (`candidates`), composes each prediction (`costs`), ranks and explains
them (`plan.build_plan`, the entry point) and renders them (`report`). The figures it computes
with come from `roundhouse.calibration` (this machine's measured rates, cached) or from an
accelerator table (`devices`). It never imports ray, and deepspeed not at all.
"""

from roundhouse.planner.plan import Plan, PlanError, build_plan, default_workers

__all__ = ["Plan", "PlanError", "build_plan", "default_workers"]
