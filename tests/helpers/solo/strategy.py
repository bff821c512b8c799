"""The solo strategy: one device, priced by its own cost model, counting its own steps."""

from __future__ import annotations

from roundhouse.parallel.base import StepStats
from roundhouse.parallel.costs import Candidate, JobShape, ModelProfile, Target
from roundhouse.parallel.single import SingleCosts, SingleDeviceStrategy


class SoloCosts(SingleCosts):
    """One device, priced as twice as fast as `single` (so `auto` has a reason to pick it)."""

    def compute_s(self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> float:
        """Half the one-device step."""
        return super().compute_s(c, p, t, shape) / 2


class SoloStrategy(SingleDeviceStrategy):
    """One device, counting its own optimizer steps (proof that it is the one running)."""

    kind = "solo"
    cost_model = SoloCosts

    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """The single-device step, reporting `train/solo_steps`."""
        stats = super().optimizer_step(need_grad_norm=need_grad_norm)
        self.steps = getattr(self, "steps", 0) + 1
        stats.extra["train/solo_steps"] = float(self.steps)
        return stats
