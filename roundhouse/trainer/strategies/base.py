"""The `Strategy` interface: the only place a parallelism mode exists.

The training loop calls, per optimizer step, `forward_backward` for each micro-batch (with
`sync=True` on the last one, where gradient exchange may happen) and then `optimizer_step`.
It never asks which strategy it has. A new mode is a new file plus an entry in `STRATEGIES`.

Loss scaling contract: the loop passes `loss_scale = micro_samples / step_samples * dp_world`,
so that when a strategy *averages* gradients over its data-parallel ranks the result equals the
gradient of the mean loss over the whole global batch, however it was split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from roundhouse.trainer.context import WorkerContext
from roundhouse.trainer.task import Task

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class TrainPlan:
    """What a strategy needs from the job to train a model."""

    task: Task
    build_optimizer: OptimizerFactory
    build_scheduler: SchedulerFactory
    grad_clip_norm: float | None = None
    autocast_dtype: torch.dtype | None = None
    # The job's batch arithmetic, for strategies that configure an engine with it (DeepSpeed).
    global_batch_size: int | None = None
    grad_accum_steps: int = 1
    # The model's `ModelSpec.pipeline_layers` (pipeline parallel builds its stages from it).
    pipeline_layers: Callable[[nn.Module], list[nn.Module]] | None = None


@dataclass
class StepStats:
    """What one optimizer step reports. `grad_norm` is the global norm before clipping.

    `extra` holds strategy-specific metrics (e.g. `train/ps_staleness_max`), logged with the
    step's train metrics when the loop logs.
    """

    grad_norm: float | None
    lr: float
    extra: dict[str, float] = field(default_factory=dict)  # more `train/*` metrics to log


class Strategy(ABC):
    """One way of computing gradients and updating parameters on one worker."""

    def __init__(self, config: Any, ctx: WorkerContext) -> None:
        self.config = config
        self.ctx = ctx

    @property
    def is_main_process(self) -> bool:
        return self.ctx.rank == 0

    @property
    def data_parallel_rank(self) -> int:
        return self.ctx.rank

    @property
    def data_parallel_size(self) -> int:
        return self.ctx.world_size

    @abstractmethod
    def setup(self, model: nn.Module, plan: TrainPlan) -> None:
        """Take ownership of the model; build optimizer and scheduler."""

    @abstractmethod
    def train_mode(self, training: bool) -> None:
        """Switch dropout/batch-norm between training and evaluation behaviour."""

    @abstractmethod
    def forward_backward(
        self, batch: dict[str, Tensor], *, loss_scale: float, sync: bool
    ) -> Tensor:
        """Forward and backward one micro-batch; return its (unscaled, detached) mean loss."""

    @abstractmethod
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Model outputs for evaluation (no gradients)."""

    @abstractmethod
    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """Clip, step optimizer and scheduler, zero gradients."""

    @abstractmethod
    def zero_grad(self) -> None:
        """Drop accumulated gradients (used to skip a non-finite step)."""

    @abstractmethod
    def all_true(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank (e.g. "my loss is finite")."""

    @abstractmethod
    def reduce_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """Sum each metric over the data-parallel ranks."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, scheduler (tensors and plain data)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (possibly saved at another world size)."""

    @abstractmethod
    def model_state_dict(self) -> dict[str, Tensor]:
        """The plain model weights (consolidated), as `model.state_dict()` names them."""

    def data_claimer(self) -> Callable[[int, int, int], int] | None:
        """Dynamic data assignment's shared chunk counter (see `StepLoader`), or None: every
        rank trains on its fixed share of each global step."""
        return None

    def compile(self, mode: str) -> None:
        """`trainer.compile`: torch.compile the set-up model in place (see trainer/compile.py)."""
        from roundhouse.trainer.compile import compile_module

        compile_module(self.model, mode)

    def close(self) -> None:
        """Release resources (process groups, actors)."""


def move_to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Copy a batch to `device` (non-blocking from pinned memory)."""
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
