"""The job file's `task:` section: which objective trains the model, and its optimizers.

`task:` takes a registered task name (`classification`, `gan`, ...) or an import path
`package.module:Class`, either as a plain string or as a section with options and
per-optimizer settings. Absent, the model's own task (`ModelSpec.loss`) is used, so every job
file written before tasks were open runs unchanged.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from .base import Section


class TaskOptimizerConfig(Section):
    """One of the task's named optimizers: which parameters, and settings over the trainer's."""

    params: list[str] | None = Field(
        None,
        description="Globs over parameter names this optimizer steps "
        "(default: the task's own choice).",
    )
    optimizer: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of trainer.optimizer to change for this optimizer (e.g. lr, betas).",
    )
    scheduler: dict[str, Any] = Field(
        default_factory=dict,
        description="Keys of trainer.scheduler to change for this optimizer's schedule.",
    )


class TaskConfig(Section):
    """`task:`: a registered name or `package.module:Class`, its options and optimizers."""

    name: str | None = Field(
        None, description="Registered task name or `package.module:Class` (default: the model's)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the task's constructor."
    )
    optimizers: dict[str, TaskOptimizerConfig] = Field(
        default_factory=dict, description="Per-optimizer parameters and settings, by name."
    )
    order: list[str] | None = Field(
        None,
        description="The order the optimizers step in each training step (default: the task's).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value
