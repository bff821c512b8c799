"""The `deepspeed` strategy's job-file section (torch-free: `roundhouse.config` imports it).

This module imports only pydantic and `roundhouse.sections`, so the job schema knows the
section without importing torch or deepspeed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt

from roundhouse.sections import StrategySection


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


__all__ = ["DeepSpeedStrategyConfig"]
