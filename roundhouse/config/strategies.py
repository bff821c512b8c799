"""The built-in `strategy` sections of the job file (an open tagged union on `kind`).

Defining a `StrategySection` subclass registers it (see `strategy_section.py`): job files
validate against it and `roundhouse schema` lists it. These are the built-in kinds: `single`,
`ring`, `ps`, `deepspeed` and `auto`; a strategy of one's own defines its section beside its
`Strategy` class.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from .base import NonNegInt, Section
from .strategy_section import StrategySection


class SingleStrategyConfig(StrategySection):
    """One device, no gradient exchange."""

    kind: Literal["single"] = "single"


class RingStrategyConfig(StrategySection):
    """roundhouse's bucketed ring all-reduce."""

    kind: Literal["ring"]
    bucket_mb: PositiveFloat = 25.0
    algorithm: Literal["ring", "native"] = "ring"
    hierarchical: bool = False
    grad_dtype: Literal["fp32", "bf16"] = "fp32"
    sparse_gradients: Literal["dense", "gather"] = Field(
        "dense",
        description="Sparse-gradient embeddings (`sparse=True`): all-reduce the whole table "
        "(`dense`) or all-gather the touched rows (`gather`).",
    )
    exact: bool = Field(
        False,
        description="Sum the gradients of `virtual_shards` fixed shards of each global batch in "
        "a fixed order: the weights do not depend on the number of workers (bit for bit).",
    )
    virtual_shards: PositiveInt = Field(
        8, description="exact: shards per global batch (at least cluster.num_workers)."
    )


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


class DeepSpeedStrategyConfig(StrategySection):
    """DeepSpeed: ZeRO data parallel, pipeline, tensor and expert parallel."""

    kind: Literal["deepspeed"]
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    pipeline_stages: PositiveInt = 1
    tensor_parallel: PositiveInt = 1
    expert_parallel: PositiveInt = 1
    config: dict[str, Any] = Field(default_factory=dict, description="Raw ds_config, merged last.")

    @property
    def model_parallel_size(self) -> int:
        """Workers holding one copy of the model: `pipeline_stages * tensor_parallel`."""
        return self.pipeline_stages * self.tensor_parallel

    @property
    def layout(self) -> str | None:
        """The strategy registry's layout key: `pipeline` with pipeline stages, else None."""
        return "pipeline" if self.pipeline_stages > 1 else None


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
