"""`single`: one device, no gradient exchange. The local debugging mode and the parity reference."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from roundhouse.parallel.base import StepStats, Strategy, TrainPlan, move_to
from roundhouse.parallel.costs import CostModel, ModelProfile


class SingleCosts(CostModel):
    """The planner's view of one device: one row on one worker, nothing exchanged."""

    grads_freed = True  # its optimizer step ends with zero_grad(set_to_none=True)

    def sections(self, workers: int, profile: ModelProfile) -> list[tuple[str, dict[str, Any]]]:
        """One row, on one worker only."""
        return [(self.kind, {"kind": self.kind})] if workers == 1 else []


class SingleDeviceStrategy(Strategy):
    """Trains the whole model on `ctx.device`; runs on one worker only."""

    kind = "single"
    max_world_size = 1
    cost_model = SingleCosts

    def setup(self, model: nn.Module, plan: TrainPlan) -> None:
        """Move the model to `ctx.device` and build the optimizer and scheduler from `plan`."""
        self.plan = plan
        self.model = model.to(self.ctx.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = plan.build_optimizer(self.params)
        self.scheduler = plan.build_scheduler(self.optimizer)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.plan.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=dtype)

    def train_mode(self, training: bool) -> None:
        """Switch the model between training and evaluation behaviour."""
        self.model.train(training)

    def forward_backward(
        self, batch: dict[str, Tensor], *, loss_scale: float, sync: bool
    ) -> Tensor:
        """Forward and backward one micro-batch under autocast; return its detached mean loss."""
        batch = move_to(batch, self.ctx.device)
        with self._autocast():
            outputs = self.plan.task.forward(self.model, batch)
            loss = self.plan.task.loss(outputs, batch)
        (loss * loss_scale).backward()
        return loss.detach()

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Model outputs for evaluation, without gradients."""
        batch = move_to(batch, self.ctx.device)
        with self._autocast():
            return self.plan.task.forward(self.model, batch)

    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """Clip (if asked), step optimizer and scheduler, zero the gradients; report norm and lr."""
        grad_norm = None
        clip = self.plan.grad_clip_norm
        if clip is not None or need_grad_norm:
            max_norm = clip if clip is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(grad_norm=grad_norm, lr=lr)

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (a skipped, non-finite step)."""
        self.optimizer.zero_grad(set_to_none=True)

    def all_true(self, flag: bool) -> bool:
        """`flag` itself: there is no other rank."""
        return flag

    def reduce_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """The sums as floats: there is no other rank to add."""
        return {k: float(v) for k, v in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer and scheduler state, for a checkpoint."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def model_state_dict(self) -> dict[str, Tensor]:
        """The model's weights, as `model.state_dict()` names them."""
        return self.model.state_dict()
