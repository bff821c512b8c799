"""Several optimizers stepped in turn, under any strategy (a GAN's discriminator, then generator).

`MultiOptimizerStrategy` holds one strategy of the job's kind per optimizer, each set up over the
same model while only that optimizer's parameters are trainable. So each part builds its own
exchange over exactly its parameters (ring: its own buckets; ps: its own shards on its own
share of the servers; DeepSpeed: its own engine and ZeRO partition), and during an optimizer's
turn (`Phase.active`) only its parameters require gradients: the backward pass produces no
gradient for another optimizer's parameters, and no other part's hooks or reductions run.

Checkpoints hold the model once and every part's optimizer and scheduler state by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from roundhouse.parallel.base import Phase, StepStats, Strategy, TrainPlan
from roundhouse.parallel.context import WorkerContext


class MultiOptimizerStrategy(Strategy):
    """One strategy per named optimizer over a shared model; `phases()` steps them in order.

    Args:
        parts: Strategy per optimizer name, in the per-step order (not yet set up).
        groups: Parameter names per optimizer (disjoint).
        plan_for: The `TrainPlan` of one optimizer (its task view, optimizer and schedule).
        ctx: This worker's context.
        on_turn: Called with `(name, True)` when optimizer `name`'s turn begins and
            `(name, False)` when it ends (the task's view of which loss to compute).
    """

    kind = "multi"

    def __init__(
        self,
        parts: dict[str, Strategy],
        groups: dict[str, list[str]],
        plan_for: Callable[[str], TrainPlan],
        ctx: WorkerContext,
        on_turn: Callable[[str, bool], None] | None = None,
    ) -> None:
        super().__init__(None, ctx)
        self.parts, self.groups, self.plan_for = parts, groups, plan_for
        self.on_turn = on_turn or (lambda name, begins: None)
        self.first = next(iter(parts.values()))

    @property
    def is_main_process(self) -> bool:
        """The first part's answer (every part runs on the same worker)."""
        return self.first.is_main_process

    @property
    def data_parallel_rank(self) -> int:
        """The first part's data-parallel rank."""
        return self.first.data_parallel_rank

    @property
    def data_parallel_size(self) -> int:
        """The first part's data-parallel size."""
        return self.first.data_parallel_size

    def setup(self, model: nn.Module, plan: TrainPlan) -> None:
        """Set every part up over `model` with only its own parameters trainable."""
        self.model = model
        self.named = dict(model.named_parameters())
        self.trainable = {n for n, p in self.named.items() if p.requires_grad}
        for name, part in self.parts.items():
            with self.active(name):
                part.setup(model, self.plan_for(name))

    @contextlib.contextmanager
    def active(self, name: str) -> Iterator[None]:
        """Optimizer `name`'s turn: the other parts' parameters are current and frozen."""
        for other, part in self.parts.items():
            if other != name:
                part.sync_parameters()
        own = set(self.groups[name])
        for pname, param in self.named.items():
            param.requires_grad_(pname in own)
        self.on_turn(name, True)
        try:
            yield
        finally:
            self.on_turn(name, False)
            for pname, param in self.named.items():
                param.requires_grad_(pname in self.trainable)

    def phases(self) -> list[Phase]:
        """One phase per optimizer, in the task's order."""
        return [
            Phase(name, part, lambda name=name: self.active(name))
            for name, part in self.parts.items()
        ]

    def sync_parameters(self) -> None:
        """Every part's parameters current."""
        for part in self.parts.values():
            part.sync_parameters()

    def train_mode(self, training: bool) -> None:
        """Every part (they share the model) in training or evaluation mode."""
        for part in self.parts.values():
            part.train_mode(training)

    def forward_backward(
        self, batch: dict[str, Tensor], *, loss_scale: float, sync: bool
    ) -> Tensor:
        """The first optimizer's turn (the loop goes through `phases()` instead)."""
        with self.active(next(iter(self.parts))):
            return self.first.forward_backward(batch, loss_scale=loss_scale, sync=sync)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Evaluation outputs with every part's parameters current."""
        self.sync_parameters()
        return self.first.forward(batch)

    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """Step the first optimizer (the loop steps each phase's own strategy)."""
        with self.active(next(iter(self.parts))):
            return self.first.optimizer_step(need_grad_norm=need_grad_norm)

    def zero_grad(self) -> None:
        """Drop every part's gradients."""
        for name, part in self.parts.items():
            with self.active(name):
                part.zero_grad()

    def all_true(self, flag: bool) -> bool:
        """The first part's agreement over the ranks."""
        return self.first.all_true(flag)

    def sum_over_replicas(self, value: float) -> float | None:
        """The first part's sum over the data-parallel ranks."""
        return self.first.sum_over_replicas(value)

    def reduce_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """The first part's sum over the data-parallel ranks."""
        return self.first.reduce_metrics(sums)

    def _merged(self, states: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """One model state: each optimizer's parameters from its own part, the rest from the
        first (buffers, frozen weights)."""
        merged = dict(next(iter(states.values())))
        for name, state in states.items():
            for pname in self.groups[name]:
                merged[pname] = state[pname]
        return merged

    def state_dict(self) -> dict[str, Any]:
        """The model once, and each optimizer's and schedule's state by name."""
        states, optimizers = {}, {}
        for name, part in self.parts.items():
            with self.active(name):
                state = part.state_dict()
            states[name] = state.pop("model")
            optimizers[name] = state
        return {"model": self._merged(states), "optimizers": optimizers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned into every part."""
        if "optimizers" not in state:
            raise KeyError("checkpoint has one optimizer, but the task steps several")
        for name, part in self.parts.items():
            with self.active(name):
                part.load_state_dict({"model": state["model"], **state["optimizers"][name]})

    def model_state_dict(self) -> dict[str, Tensor]:
        """The consolidated model weights."""
        states = {}
        for name, part in self.parts.items():
            with self.active(name):
                states[name] = part.model_state_dict()
        return self._merged(states)

    def data_claimer(self) -> Callable[[int, int, int], int] | None:
        """The first part's data claimer."""
        return self.first.data_claimer()

    def compile(self, mode: str) -> None:
        """torch.compile each part's model."""
        for part in self.parts.values():
            part.compile(mode)

    def close(self) -> None:
        """Close every part (the last first: the first may own the process group)."""
        for part in reversed(list(self.parts.values())):
            part.close()


def build_multi_strategy(
    build_part: Callable[[WorkerContext], Strategy],
    split_context: Callable[[WorkerContext, int, int], WorkerContext],
    groups: dict[str, list[str]],
    plan_for: Callable[[str], TrainPlan],
    ctx: WorkerContext,
    on_turn: Callable[[str, bool], None] | None = None,
) -> MultiOptimizerStrategy:
    """A `MultiOptimizerStrategy` whose parts come from `build_part` on each one's context
    (`split_context`: e.g. a ps part's share of the parameter servers)."""
    count = len(groups)
    parts = {
        name: build_part(split_context(ctx, index, count)) for index, name in enumerate(groups)
    }
    return MultiOptimizerStrategy(parts, groups, plan_for, ctx, on_turn)
