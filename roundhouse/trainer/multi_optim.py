"""A task's named optimizers: which parameters each steps, with which settings, in what order.

`resolve_optimizers` turns the task's `OptimizerSpec`s and the job's `task.optimizers` /
`task.order` into `OptimizerGroup`s (checked: every glob names a parameter, no parameter is in
two optimizers). `build_task_strategy` returns the job's strategy as it always was for one
optimizer, and a `MultiOptimizerStrategy` (one part per optimizer) for several.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from roundhouse.config import JobSpec, OptimizerConfig, SchedulerConfig
from roundhouse.data import DataInfo
from roundhouse.errors import JobFileError
from roundhouse.parallel.base import Strategy, TrainPlan
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.multi import build_multi_strategy
from roundhouse.parallel.registry import build_strategy, get_strategy_class
from roundhouse.trainer.task_api import OptimizerSpec, Task

logger = logging.getLogger(__name__)


@dataclass
class OptimizerGroup:
    """One resolved optimizer: its parameter names and its own optimizer and schedule."""

    name: str
    names: list[str]
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig


def optimizer_specs(task: Task, job: JobSpec) -> list[OptimizerSpec]:
    """The task's optimizers with the job's `task.optimizers.*.params` and `task.order` applied.

    Raises:
        JobFileError: The job names an optimizer the task does not have, or a bad order.
    """
    specs = {spec.name: spec for spec in task.optimizers()}
    for name, override in job.task.optimizers.items():
        if name not in specs:
            raise JobFileError(
                f"task.optimizers.{name}: the task has no optimizer {name!r}",
                f"valid: {', '.join(specs)}",
            )
        if override.params is not None:
            specs[name] = OptimizerSpec(name, list(override.params))
    order = job.task.order or list(specs)
    if sorted(order) != sorted(specs):
        raise JobFileError(
            f"task.order={order} must name each of the task's optimizers once",
            f"use an order of {', '.join(specs)}",
        )
    return [specs[name] for name in order]


def assign_parameters(specs: list[OptimizerSpec], trainable: list[str]) -> dict[str, list[str]]:
    """Parameter names per optimizer (globs first; a spec without globs takes the rest).

    Raises:
        JobFileError: A glob matches no trainable parameter, or a parameter is in two optimizers.
    """
    owner: dict[str, str] = {}
    for spec in specs:
        for glob in spec.params or []:
            matched = [n for n in trainable if fnmatch.fnmatchcase(n, glob)]
            if not matched:
                raise JobFileError(
                    f"optimizer {spec.name!r} names parameters {glob!r}, which match no "
                    "trainable parameter (they belong to no optimizer)",
                    f"use a glob over the model's parameter names, e.g. {trainable[0]!r}",
                )
            for pname in matched:
                if owner.setdefault(pname, spec.name) != spec.name:
                    raise JobFileError(
                        f"parameter {pname!r} belongs to optimizers {owner[pname]!r} and "
                        f"{spec.name!r}",
                        "give each optimizer disjoint parameter globs",
                    )
    rest = [n for n in trainable if n not in owner]
    groups = {spec.name: [n for n in trainable if owner.get(n) == spec.name] for spec in specs}
    takers = [spec.name for spec in specs if spec.params is None]
    if takers:
        groups[takers[0]] = rest
    elif rest:
        logger.warning("%d trainable parameters belong to no optimizer: not trained", len(rest))
    return groups


def resolve_optimizers(task: Task, job: JobSpec, model: nn.Module) -> list[OptimizerGroup]:
    """The task's optimizers over `model`'s trainable parameters, in stepping order."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    specs = optimizer_specs(task, job)
    groups = assign_parameters(specs, trainable)
    resolved = []
    for spec in specs:
        override = job.task.optimizers.get(spec.name)
        opt, sched = job.trainer.optimizer, job.trainer.scheduler
        if override is not None:
            opt = OptimizerConfig.model_validate({**opt.model_dump(), **override.optimizer})
            sched = SchedulerConfig.model_validate({**sched.model_dump(), **override.scheduler})
        resolved.append(OptimizerGroup(spec.name, groups[spec.name], opt, sched))
    return resolved


class TurnTask(Task):
    """A task as one optimizer's turn sees it: in its turn, `forward` is `step_loss`."""

    def __init__(self, task: Task, name: str) -> None:
        self.task, self.name, self.in_turn = task, name, False

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The turn's loss (in the turn), else the task's outputs."""
        if self.in_turn:
            return self.task.step_loss(model, batch, self.name)
        return self.task.forward(model, batch)

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """In the turn, `forward` already returned the loss."""
        return outputs if self.in_turn else self.task.loss(outputs, batch)

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The task's own."""
        return self.task.eval_sums(outputs, batch)

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """The task's own."""
        return self.task.finalize(sums)


def build_task_strategy(
    job: JobSpec,
    ctx: WorkerContext,
    task: Task,
    model: nn.Module,
    plan_of: Callable[[JobSpec, Task], TrainPlan],
) -> Strategy:
    """The strategy for `task` (not set up yet).

    One optimizer: the job's strategy, as always. Several: a `MultiOptimizerStrategy` whose
    part for each optimizer is set up with `plan_of(job, turn)`, `job` carrying that
    optimizer's `trainer.optimizer` and `trainer.scheduler` and `turn` the task's view of it.
    """
    groups = resolve_optimizers(task, job, model)
    if len(groups) == 1 and not job.task.optimizers:
        return build_strategy(job.strategy, ctx)
    cls = get_strategy_class(job.strategy)
    cls.check_optimizers(job, [g.name for g in groups])
    turns = {g.name: TurnTask(task, g.name) for g in groups}
    by_name = {g.name: g for g in groups}

    def plan_for(name: str) -> TrainPlan:
        return plan_of(with_group(job, by_name[name]), turns[name])

    def on_turn(name: str, begins: bool) -> None:
        turns[name].in_turn = begins

    return build_multi_strategy(
        lambda part_ctx: build_strategy(job.strategy, part_ctx),
        cls.split_context,
        {g.name: g.names for g in groups},
        plan_for,
        ctx,
        on_turn,
    )


def with_group(job: JobSpec, group: OptimizerGroup) -> JobSpec:
    """`job` with `group`'s optimizer and schedule as the trainer's."""
    trainer = job.trainer.model_copy(
        update={"optimizer": group.optimizer, "scheduler": group.scheduler}
    )
    return job.model_copy(update={"trainer": trainer})


def check_task_optimizers(
    job: JobSpec, model: nn.Module, info: DataInfo | None = None
) -> list[str]:
    """Pre-flight: the job's task loads, and its optimizers fit `model` (meta is fine, with
    `trainer.freeze` applied) and the job's strategy; report lines for `--dry-run`. `info`
    (the data's `DataInfo`) lets value targets name the task `regression`, as training does.

    Raises:
        TaskError: The task does not import or is not a `Task`.
        JobFileError: An optimizer names parameters of another optimizer or of none, or the
            strategy cannot step several optimizers in its layout.
    """
    from roundhouse.trainer.task import build_job_task, task_name  # imports every task

    name = task_name(job, info)
    task = build_job_task(job, info)
    groups = resolve_optimizers(task, job, model)
    if len(groups) == 1 and not job.task.optimizers:
        return [f"task {name}"]
    try:
        strategy = get_strategy_class(job.strategy)
    except JobFileError:  # `auto`: the strategy is chosen later, and checked then
        strategy = None
    if strategy is not None:
        strategy.check_optimizers(job, [g.name for g in groups])
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    turns = ", then ".join(f"{g.name} ({sum(sizes[n] for n in g.names):,})" for g in groups)
    return [f"task {name}: optimizers {turns} parameters, each step"]
