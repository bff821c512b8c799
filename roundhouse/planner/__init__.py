"""`roundhouse plan`: predict per-rank memory and step time of every strategy before launch.

Pure planning code: it imports torch and roundhouse's models, data and job schema, never ray,
and deepspeed not at all. See `plan.build_plan` for the entry point, `costs` for the formulas,
`trace` for the meta-device trace and `calibrate` for the cached measurements of this machine.
"""

from roundhouse.planner.plan import Plan, PlanError, build_plan, default_workers

__all__ = ["Plan", "PlanError", "build_plan", "default_workers"]
