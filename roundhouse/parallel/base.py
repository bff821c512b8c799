"""The `Strategy` interface: the only place a parallelism mode exists.

The training loop calls, per optimizer step, `forward_backward` for each micro-batch (with
`sync=True` on the last one, where gradient exchange may happen) and then `optimizer_step`.
It never asks which strategy it has. A new mode is a new module plus one line in
`roundhouse.parallel.registry.STRATEGIES`.

Launch and cluster never ask for a strategy's kind either: they ask its class. `check_world_size`
and `check_job` run before anything starts (the launcher's checks, `--dry-run`), and
`services(job)` lists the driver-side services (`ServiceSpec`) the driver starts before the
workers and hands to them in `WorkerContext.services`.

Loss scaling contract: the loop passes `loss_scale = micro_samples / step_samples * dp_world`,
so that when a strategy *averages* gradients over its data-parallel ranks the result equals the
gradient of the mean loss over the whole global batch, however it was split. A task whose loss
is a mean over a data-dependent number of items (target tokens, masked positions: its
`loss_items`) gets `loss_scale = micro_items / step_items * dp_world` instead, `step_items`
being the whole global batch's count (`sum_over_replicas` of the ranks' counts), so the result
is the gradient of the global batch's item mean (see trainer/losses.py).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology
from roundhouse.errors import JobFileError
from roundhouse.parallel.compile import compile_module
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.costs import CostModel
from roundhouse.parallel.services import ServiceSpec


class StepTask(Protocol):
    """What a strategy needs of the loop's task (`trainer.task.Task` extends it): the model's
    outputs for a batch and their loss. Defined here, so that parallel/ never imports trainer/."""

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's outputs for `batch`."""

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The scalar training loss of one micro-batch (a mean over its samples)."""


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass
class TrainPlan:
    """What a strategy needs from the job to train a model."""

    task: StepTask
    build_optimizer: OptimizerFactory
    build_scheduler: SchedulerFactory
    grad_clip_norm: float | None = None
    autocast_dtype: torch.dtype | None = None
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


@dataclass
class Phase:
    """One optimizer's turn in a training step (a task with several optimizers has several).

    The loop enters `active()`, runs the step's micro-batches through `strategy` and steps it.
    """

    name: str
    strategy: Strategy
    active: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class Strategy(ABC):
    """One way of computing gradients and updating parameters on one worker.

    Class attributes say what the strategy needs before it exists:

    Attributes:
        kind: The `strategy.kind` it implements (for messages; the registry maps kinds).
        max_world_size: The most workers it runs on (None: any number).
        cost_model: How `roundhouse plan` prices it (`roundhouse.parallel.costs`): the
            registry instantiates it with the strategy's kind, so a strategy that inherits
            another's cost model is planned under its own kind; None: never planned.
    """

    kind: ClassVar[str] = ""
    max_world_size: ClassVar[int | None] = None
    cost_model: ClassVar[type[CostModel] | None] = None
    supports_live_recovery: ClassVar[bool] = False  # `regroup` works (cluster.recovery: live)

    def __init__(self, config: Any, ctx: WorkerContext) -> None:
        """Bind the strategy to its `strategy` job section and this worker's context.

        Args:
            config: The job's `strategy` section (the pydantic model of this kind).
            ctx: Where this worker runs (rank, world size, device).
        """
        self.config = config
        self.ctx = ctx

    @classmethod
    def check_world_size(cls, world_size: int) -> None:
        """Raise `JobFileError` when this strategy cannot run on `world_size` workers.

        Raises:
            JobFileError: `world_size` is above `max_world_size`.
        """
        most = cls.max_world_size
        if most is not None and world_size > most:
            runs_on = "one worker" if most == 1 else f"at most {most} workers"
            raise JobFileError(
                f"strategy.kind={cls.kind} runs on {runs_on}, but cluster.num_workers={world_size}",
                "pass --local, set cluster.num_workers=1, or pick a distributed strategy",
            )

    @classmethod
    def check_job(cls, job: JobSpec, world_size: int) -> None:
        """Strategy-specific checks of `job` on `world_size` workers, before anything starts.

        The launcher calls it after the shared topology checks (`Topology.check`); the default
        checks nothing more.

        Raises:
            JobFileError: The job cannot run with this strategy (the field and the fix named).
        """

    @classmethod
    def services(cls, job: JobSpec) -> list[ServiceSpec]:
        """The driver-side services `job` needs beside its workers (`roundhouse.cluster`
        starts them before the worker group and hands them to every worker in
        `WorkerContext.services`); none by default."""
        return []

    @classmethod
    def service_cpus(cls, job: JobSpec) -> float:
        """CPUs the job's services reserve on the cluster (0 without services)."""
        return sum(spec.cpus for spec in cls.services(job))

    @classmethod
    def local_services(cls) -> contextlib.AbstractContextManager[Any]:
        """Its driver-side services hosted by a process of this machine, for ranks spawned
        here (the planner's exchange probes, multi-process tests): a context manager that
        yields an address for `attach_local_services`. Default: none (yields None)."""
        return contextlib.nullcontext(None)

    @classmethod
    def attach_local_services(cls, ctx: WorkerContext, address: Any, config: Any) -> WorkerContext:
        """`ctx` connected to the services at `address` (`local_services`) as the `strategy`
        section `config` uses them; unchanged by default."""
        return ctx

    @classmethod
    def check_optimizers(cls, job: JobSpec, names: list[str]) -> None:
        """Refuse a task that steps the optimizers `names` in turn, where this strategy cannot.

        Raises:
            JobFileError: The layout cannot hold several optimizers (the fix named).
        """

    @classmethod
    def split_context(cls, ctx: WorkerContext, index: int, count: int) -> WorkerContext:
        """The context of optimizer `index` of `count` (a task with several): the same."""
        return ctx

    @property
    def is_main_process(self) -> bool:
        """Whether this worker writes the run folder (logs, checkpoints): global rank 0."""
        return self.ctx.rank == 0

    @property
    def topology(self) -> Topology:
        """This worker's batch and rank layout: `ctx.topology` (built once per worker), or,
        for a strategy built without one (a test, a benchmark), its section's layout of a
        one-sample batch."""
        if self.ctx.topology is not None:
            return self.ctx.topology
        return Topology.of_section(
            self.config, self.ctx.world_size, global_batch=1, grad_accum_steps=1
        )

    @property
    def data_parallel_rank(self) -> int:
        """This worker's index among the data-parallel replicas (its share of each batch): the
        strategy's rank order. Default: the global rank (every worker is a replica)."""
        return self.ctx.rank

    @property
    def data_parallel_size(self) -> int:
        """Data-parallel replicas, from the layout (`topology.data_parallel`)."""
        return self.topology.data_parallel

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

    def sum_over_replicas(self, value: float) -> float | None:
        """`value` summed over the data-parallel ranks that train this step (each passes its
        own): the loop's count of the global batch's loss items. None where the ranks take no
        common step (an asynchronous parameter server), so that each rank normalises by its
        own count. Default: through `reduce_metrics`; strategies override it with one scalar
        all-reduce."""
        return self.reduce_metrics({"value": torch.tensor(float(value), dtype=torch.float64)})[
            "value"
        ]

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, scheduler (tensors and plain data)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (possibly saved at another world size)."""

    @abstractmethod
    def model_state_dict(self) -> dict[str, Tensor]:
        """The plain model weights (consolidated), as `model.state_dict()` names them."""

    def phases(self) -> list[Phase]:
        """The optimizer steps of one training step, in order: this strategy's one optimizer."""
        return [Phase("main", self)]

    def sync_parameters(self) -> None:
        """Make the local parameters current (a strategy that updates them remotely waits)."""

    def data_claimer(self) -> Callable[[int, int, int], int] | None:
        """Dynamic data assignment's shared chunk counter (see `StepLoader`), or None: every
        rank trains on its fixed share of each global step."""
        return None

    def virtual_shards(self) -> int | None:
        """Exact mode's fixed number of micro-batches per global step (see `StepLoader`), or
        None: the loader cuts `world_size * grad_accum_steps` of them."""
        return None

    def compile(self, mode: str) -> None:
        """`trainer.compile`: torch.compile the set-up model in place (see parallel/compile.py)."""

        compile_module(self.model, mode)

    def regroup(self, ctx: WorkerContext, *, joining: bool = False) -> None:
        """Go on in a re-formed default process group (`ctx`: the new rank and world size).

        Called by live recovery after `close()`, with the model and optimizer state kept.
        `joining`: a replacement worker joins this generation and runs `setup` there, so the
        members run the same collectives `setup` runs. Only strategies with
        `supports_live_recovery` implement it.
        """
        raise NotImplementedError(f"strategy.kind={self.kind} cannot re-form its group")

    def peer_state_dict(self) -> dict[str, Any]:
        """What a live peer hands another worker (live recovery: agreeing on the committed
        step, or a replacement joining): `state_dict()` unless the state lives elsewhere."""
        return self.state_dict()

    def load_peer_state_dict(self, state: dict[str, Any]) -> None:
        """Take what a live peer's `peer_state_dict` returned."""
        self.load_state_dict(state)

    def hold_gradient(self) -> Any | None:
        """Live recovery, as a lost peer is noticed: this rank's own gradients of the step
        that failed, as they were before any exchange (opaque to the caller), or None where
        the strategy does not keep them. With them, the survivors redo only the lost peer's
        share of the step (`restore_gradient`); without, they redo the whole step."""
        return None

    def restore_gradient(self, held: Any, scale: float) -> None:
        """After `regroup`: set the gradients to `scale` times what `hold_gradient` returned
        (the ratio of the new world size to the old: each share's loss scale holds it)."""
        raise NotImplementedError(f"strategy.kind={self.kind} holds no gradient")

    def live_lag(self) -> int:
        """After `regroup`: steps that the state held outside the workers (ps servers) has
        committed beyond this worker's own count; 0 where the workers hold the state."""
        return 0

    def close(self) -> None:
        """Release resources (process groups, actors)."""


def loss_weight(task: StepTask, batch: dict[str, Tensor]) -> int:
    """What one micro-batch's mean loss weighs against others: the items its loss averages
    over where the task declares them (`Task.loss_items`), else its samples."""
    items = getattr(task, "loss_items", None)
    count = items(batch) if items is not None else None
    return int(batch["target"].shape[0]) if count is None else int(count)


def move_to(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Copy a batch to `device` (non-blocking from pinned memory)."""
    if all(t.device == device for t in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
