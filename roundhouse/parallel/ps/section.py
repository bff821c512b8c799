"""The `ps` strategy's job-file section (torch-free: `roundhouse.config` imports it).

This module imports only pydantic and `roundhouse.sections`, so the job schema knows the
section without importing torch; the package's `__init__` stays lazy for the same reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveInt, model_validator

from roundhouse.sections import NonNegInt, Section, StrategySection


class SlowWorkerConfig(Section):
    """Straggler injection (tests, benchmarks): one worker runs `factor` times slower."""

    rank: NonNegInt = Field(description="The worker (global rank) to slow down.")
    factor: Annotated[float, Field(ge=1)] = Field(
        2.0,
        description="Each of its training steps (data, compute, exchange) takes this many "
        "times as long: it sleeps (factor - 1) times the step's own time.",
    )


class PSStrategyConfig(StrategySection):
    """roundhouse's parameter server on Ray actors."""

    kind: Literal["ps"]
    num_servers: PositiveInt = 1
    mode: Literal["sync", "async", "ssp"] = "sync"
    staleness: NonNegInt = 2
    node_aggregation: bool = True
    server_resources: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="What each server shard's Ray actor reserves: CPU (its update threads), "
        "GPU, custom resources.",
    )
    slow_worker: SlowWorkerConfig | None = Field(
        None, description="Straggler injection, e.g. {rank: 1, factor: 2.0}."
    )
    data_assignment: Literal["static", "dynamic"] | None = Field(
        None,
        description="Who trains on which batches: `static` shares (every worker the same "
        "number of steps), or `dynamic` (async/ssp: workers claim each epoch's batches as "
        "they go, so a fast worker takes more). Default: dynamic for async/ssp where the job "
        "allows it (no trainer.max_steps or eval_every_steps, no streamed data).",
    )

    def resolve_in(self, job: Any) -> None:
        """`data_assignment` in `job`: refused with a step bound or streamed data, and, where
        unset, dynamic for async/ssp jobs that allow it, else static.

        Raises:
            ValueError: `data_assignment=dynamic` with a conflicting job field (named).
        """
        if self.data_assignment == "static":
            return
        conflicts = [
            name
            for name, present in (
                ("trainer.max_steps", job.trainer.max_steps is not None),
                ("trainer.eval_every_steps", job.trainer.eval_every_steps is not None),
                ("data.train (streamed data)", job.data.train is not None),
            )
            if present
        ]
        if self.data_assignment == "dynamic" and conflicts:
            raise ValueError(
                f"strategy.data_assignment=dynamic does not work with {conflicts[0]}: each "
                "worker takes its own number of steps, so bound the run by trainer.max_epochs "
                "(or set strategy.data_assignment=static)"
            )
        if self.data_assignment is None:
            dynamic = self.mode != "sync" and not conflicts
            self.data_assignment = "dynamic" if dynamic else "static"

    @model_validator(mode="after")
    def _dynamic_needs_async(self) -> PSStrategyConfig:
        if self.data_assignment == "dynamic" and self.mode == "sync":
            raise ValueError(
                "strategy.data_assignment=dynamic needs strategy.mode async or ssp "
                "(sync trains every worker in step)"
            )
        return self


__all__ = ["PSStrategyConfig", "SlowWorkerConfig"]
