"""`deepspeed` with `pipeline_stages > 1`: DeepSpeed's pipeline engine (with ZeRO 0 or 1).

The model's `ModelSpec.pipeline_layers` (handed over as `TrainPlan.pipeline_layers`) becomes a
`deepspeed.pipe.PipelineModule`; `strategy.config.pipeline.partition` picks how the layers are
split over the stages. Stages are the slow axis of DeepSpeed's topology: global rank =
stage * data_parallel + dp_rank. Every rank of one pipeline reads the same batches (its
data-parallel rank's); the first stage feeds the model input, the last computes the task's loss.

Training. `PipelineEngine.train_batch` runs all micro-batches of an optimizer step at once
(1F1B schedule), so `forward_backward` only buffers micro-batches until the one with
`sync=True`, then runs the pipeline on all of them. The loop adds up `float(loss) * samples`
over the micro-batches of a step; the micro-batches of a step therefore return 0 while buffered
and the synchronising one returns `sum(loss_i * n_i) / n_last`, so the loop's sum (and the
logged `train/loss`) is exact. The schedule runs without its `OptimizerStep`: the loop still
checks the loss for NaN before `optimizer_step` steps (or `zero_grad` skips).

Evaluation runs the stages by hand, one after another, broadcasting each stage's output to
its pipeline (not `eval_batch`: it calls a world-wide barrier per batch, and data-parallel
replicas may have different numbers of evaluation batches). Every rank of a pipeline returns
the same outputs; `reduce_metrics` sums over the data-parallel group only.

Checkpoints are those of `DeepSpeedStrategy`: consolidated weights named as the unpipelined
`model.state_dict()` names them (each stage's parameters are mapped back by identity, since
`pipeline_layers` holds the model's own modules) and the optimizer in `torch.optim` layout, so
a pipeline checkpoint resumes under `single` (or another layout) and vice versa.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.errors import JobFileError, ModelError
from roundhouse.parallel.base import StepStats, TrainPlan
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.deepspeed.config import pipeline_partition
from roundhouse.parallel.deepspeed.section import DeepSpeedStrategyConfig
from roundhouse.parallel.deepspeed.state import ZeroState, merge_named
from roundhouse.parallel.deepspeed.strategy import (
    DeepSpeedStrategy,
    init_deepspeed_dist,
    tied_aliases,
)

logger = logging.getLogger(__name__)


class PipelineStrategy(DeepSpeedStrategy):
    """Trains through a `PipelineEngine`; see the module docstring for the contract."""

    def __init__(self, config: DeepSpeedStrategyConfig, ctx: WorkerContext) -> None:
        super().__init__(config, ctx)
        self.pending: list[tuple[dict[str, Tensor], float]] = []  # buffered micro-batches
        self.recorded: list[Tensor] = []  # last stage: unscaled loss of each micro-batch

    # --- setup ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, plan: TrainPlan) -> None:
        """Cut the model into stages from `plan.pipeline_layers` and build the pipeline engine."""
        self.plan = plan
        self.owns_process_group = init_deepspeed_dist(self.ctx)
        self.model = model.to(self.ctx.device)  # the unpipelined model: names and buffers
        self.canonical = [n for n, p in model.named_parameters() if p.requires_grad]
        self.aliases = tied_aliases(model)
        layers = self.layers_of(model, plan)
        self.names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
        self.layer_tensors = {id(t) for layer in layers for t in layer_tensors(layer)}
        pipe = self.build_pipeline(layers)
        self.engine = self.build_engine(pipe, plan)
        self.engine._train_schedule = functools.partial(gradients_only_schedule, self.engine)
        self.grid = self.engine.grid
        self.dp_group = self.grid.get_data_parallel_group()
        self.pipe_group = self.grid.get_pipe_parallel_group()
        self.zero = ZeroState(self.engine, self.config.zero_stage)
        self.check_stages_have_parameters()

    def layers_of(self, model: nn.Module, plan: TrainPlan) -> list[nn.Module]:
        """The model's pipeline layers, checked: enough of them, no weight in two, none missed.

        Raises:
            JobFileError: the model has no `pipeline_layers`, fewer layers than stages, a
                weight shared by two layers (tied), or an auxiliary loss (MoE) that the last
                stage could not add.
        """
        stages = self.config.pipeline_stages
        if plan.pipeline_layers is None:
            raise JobFileError(
                f"strategy.pipeline_stages={stages}: the model has no pipeline_layers",
                "use a model with a flat layer list (gpt, mlp, resnet, vgg, ...) or "
                "pipeline_stages=1",
            )
        layers = list(plan.pipeline_layers(model))
        if len(layers) < stages:
            raise JobFileError(
                f"strategy.pipeline_stages={stages} but the model has only {len(layers)} "
                "pipeline layers",
                f"use at most {len(layers)} pipeline stages or a deeper model",
            )
        if any(hasattr(m, "aux_loss") for m in model.modules()):
            raise JobFileError(
                "pipeline parallel cannot add auxiliary (MoE balance) losses computed on "
                "earlier stages to the last stage's loss",
                "use strategy.expert_parallel instead of pipeline_stages for MoE models",
            )
        check_layers_cover_model(model, layers)
        return layers

    def build_pipeline(self, layers: list[nn.Module]) -> nn.Module:
        """The `PipelineModule` of `layers` (this rank builds only its own stage's layers)."""
        from deepspeed.pipe import PipelineModule

        printed = io.StringIO()  # DeepSpeed prints the partition on rank 0: log it instead
        with contextlib.redirect_stdout(printed):
            pipe = PipelineModule(
                layers=layers,
                num_stages=self.config.pipeline_stages,
                loss_fn=self.pipeline_loss,
                partition_method=pipeline_partition(self.config.config),
                dynamic_shape=True,  # micro-batches may differ in size (an epoch's last)
            )
        if printed.getvalue().strip():
            logger.info("pipeline partition:\n%s", printed.getvalue().rstrip())
        for param in pipe.parameters():
            # Each stage owns its parameters. DeepSpeed's ZeRO-0 gradient clipping counts a
            # parameter on model-parallel rank > 0 (every stage but the first) only when it
            # is marked model-parallel; unmarked, the clipping norm would miss later stages.
            param.model_parallel = True  # type: ignore[attr-defined]
        return pipe

    def check_stages_have_parameters(self) -> None:
        """Raise `JobFileError` on every rank if some stage got no trainable parameter."""
        mine = any(p.requires_grad for p in self.engine.module.parameters())
        if not self.all_true(mine):
            method = pipeline_partition(self.config.config)
            raise JobFileError(
                f"a pipeline stage has no trainable parameters with partition={method}",
                "set strategy.config.pipeline.partition=parameters or use fewer stages",
            )

    # --- topology ---------------------------------------------------------------------------

    @property
    def stage(self) -> int:
        """This worker's pipeline stage."""
        return self.grid.get_stage_id()

    def stage_rank(self, stage: int) -> int:
        """The global rank of `stage` in this rank's pipeline."""
        return self.grid.stage_to_global(stage)

    @property
    def last_stage(self) -> int:
        """The stage that computes the loss."""
        return self.config.pipeline_stages - 1

    # --- training ---------------------------------------------------------------------------

    def forward_backward(
        self, batch: dict[str, Tensor], *, loss_scale: float, sync: bool
    ) -> Tensor:
        """Buffer the micro-batch; on `sync`, run the pipeline over all buffered ones.

        Returns 0 for a buffered micro-batch and `sum(loss_i * n_i) / n_last` for the
        synchronising one, so that the loop's `sum(float(loss) * n)` is the step's exact
        loss sum (see the module docstring).
        """
        self.pending.append((self.engine_batch(batch), loss_scale))
        if not sync:
            return torch.zeros(())
        pending, self.pending = self.pending, []
        losses = self.run_pipeline(pending)
        sizes = torch.tensor([float(b["target"].shape[0]) for b, _ in pending])
        return (losses.cpu() * sizes).sum() / sizes[-1]

    def run_pipeline(self, pending: list[tuple[dict[str, Tensor], float]]) -> Tensor:
        """Forward and backward all `pending` micro-batches; their unscaled losses, (k,)."""
        items = [(self.model_input(b), {"batch": b, "scale": s}) for b, s in pending]
        self.engine.micro_batches = len(items)  # the schedule's length (an epoch's end)
        self.recorded = []
        with contextlib.redirect_stdout(io.StringIO()):  # its step-0 loss and throughput line
            self.engine.train_batch(iter(items))
        return self.broadcast_losses(len(items))

    def pipeline_loss(self, outputs: Tensor, labels: dict[str, Any]) -> Tensor:
        """The last stage's loss of one micro-batch, scaled for DeepSpeed's backward.

        DeepSpeed divides the loss by `gradient_accumulation_steps` before backward and
        averages gradients over the data-parallel ranks. The loop's `loss_scale` already
        holds the micro-batch's share of the step and the data-parallel size (the contract
        in base.py, which also covers micro-batches of unequal size), so multiplying by the
        accumulation steps undoes DeepSpeed's division: backward sees `loss * loss_scale`,
        as in `DeepSpeedStrategy` (`scale_wrt_gas=False`).
        """
        loss = self.plan.task.loss(outputs, labels["batch"])
        self.recorded.append(loss.detach().float())
        return loss * (labels["scale"] * self.engine.gradient_accumulation_steps())

    def broadcast_losses(self, count: int) -> Tensor:
        """The last stage's recorded losses on every rank of the pipeline."""
        if self.stage == self.last_stage:
            losses = torch.stack(self.recorded).to(self.ctx.device)
        else:
            losses = torch.zeros(count, device=self.ctx.device)
        dist.broadcast(losses, src=self.stage_rank(self.last_stage), group=self.pipe_group)
        return losses

    def model_input(self, batch: dict[str, Tensor]) -> Tensor:
        """What the task passes to the model for `batch` (e.g. a masked LM's masked tokens)."""
        capture = InputCapture()
        self.plan.task.forward(capture, batch)
        return capture.seen

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """The last stage's outputs for `batch`, on every rank of the pipeline."""
        batch = self.engine_batch(batch)
        x: Tensor | None = self.model_input(batch)
        for stage in range(self.config.pipeline_stages):
            if stage == self.stage:
                x = self.engine.module(x)
            x = broadcast_tensor(
                x if stage == self.stage else None,
                src=self.stage_rank(stage),
                group=self.pipe_group,
                device=self.ctx.device,
            )
        assert x is not None
        return x

    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """Step the engine once; report the global norm over every stage and the lr."""
        lr = self.zero.base.param_groups[0]["lr"]
        norm = None
        if self.config.zero_stage == 0 and need_grad_norm:
            norm = self.plain_grad_norm()
        self.engine._exec_optimizer_step()  # the step the schedule left out (clip, step, LR)
        if self.config.zero_stage > 0 and need_grad_norm:
            value = self.engine.get_global_grad_norm()
            norm = float(value) if value is not None else None
        return StepStats(grad_norm=norm, lr=lr, extra=self.step_metrics())

    def plain_grad_norm(self) -> float:
        """Global gradient norm without ZeRO: each stage's squares, summed over the pipeline."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        total = torch.zeros((), dtype=torch.float32, device=self.ctx.device)
        for grad in grads:
            total += grad.detach().float().pow(2).sum()
        dist.all_reduce(total, group=self.pipe_group)
        return float(total.sqrt())

    def zero_grad(self) -> None:
        """Drop buffered micro-batches and accumulated gradients."""
        self.pending = []
        super().zero_grad()

    # --- state ------------------------------------------------------------------------------

    def local_named_params(self) -> list[tuple[str, nn.Parameter]]:
        """This stage's trainable parameters, named as the unpipelined model names them."""
        named = [(self.names[id(p)], p) for p in self.engine.module.parameters() if p.requires_grad]
        return sorted(named, key=lambda kv: self.canonical_index(kv[0]))

    def local_buffers(self) -> dict[str, Tensor]:
        """Buffers this stage keeps current: its layers' own, and those no layer holds."""
        mine = {id(t) for t in self.engine.module.buffers()}
        return {
            name: buffer.detach().cpu().clone()
            for name, buffer in self.model.named_buffers()
            if id(buffer) in mine or id(buffer) not in self.layer_tensors
        }

    def gather_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Full weights and optimizer state of the whole model, on every rank (collective)."""
        weights, state = self.zero.gather(self.local_named_params())
        weights.update(self.local_buffers())
        parts: list[Any] = [None] * self.config.pipeline_stages
        dist.all_gather_object(parts, (weights, state), group=self.pipe_group)
        weights = merge_named(part[0] for part in parts)
        state = merge_named(part[1] for part in parts)
        for alias, name in self.aliases.items():
            weights[alias] = weights[name]
        return weights, state


class InputCapture(nn.Module):
    """Stands in for the model in `task.forward` and keeps the input the task gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Record the call's arguments and stop the forward (captures a stage's input)."""
        if kwargs or len(args) != 1:
            raise JobFileError(
                "pipeline parallel needs a task that calls the model with one input tensor",
                "use strategy.pipeline_stages=1 for this model",
            )
        self.seen = args[0]
        return args[0]


def layer_tensors(layer: nn.Module) -> list[Tensor]:
    """The parameters and buffers of one pipeline layer."""
    return [*layer.parameters(), *layer.buffers()]


def check_layers_cover_model(model: nn.Module, layers: list[nn.Module]) -> None:
    """Every trainable parameter in exactly one pipeline layer.

    Raises:
        JobFileError: a parameter is in two layers (tied weights cannot stay tied across
            stages).
        ModelError: a parameter is in no layer (the model's `pipeline_layers` is wrong).
    """
    owner: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for param in layer.parameters():
            if owner.setdefault(id(param), index) != index:
                raise JobFileError(
                    f"pipeline layers {owner[id(param)]} and {index} share a weight, which "
                    "cannot stay tied when they land on different stages",
                    "set model.options.tie_weights=false",
                )
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if missing:
        raise ModelError(
            f"the model's pipeline_layers leave out parameter {missing[0]!r}",
            "pipeline_layers must return every module of the model's forward",
        )


def broadcast_tensor(
    tensor: Tensor | None, *, src: int, group: Any, device: torch.device
) -> Tensor:
    """`tensor` from global rank `src` on every rank of `group` (shape and dtype sent first)."""
    meta = [(tuple(tensor.shape), tensor.dtype) if tensor is not None else None]
    dist.broadcast_object_list(meta, src=src, group=group, device=device)
    shape, dtype = meta[0]
    out = tensor.contiguous() if tensor is not None else torch.empty(shape, dtype=dtype)
    out = out.to(device)
    dist.broadcast(out, src=src, group=group)
    return out


@functools.cache
def _gradients_only_class() -> type:
    from deepspeed.runtime.pipe.schedule import OptimizerStep, TrainSchedule

    class GradientsOnlySchedule(TrainSchedule):
        """DeepSpeed's 1F1B training schedule up to the gradient reduction, without the step."""

        def steps(self):  # type: ignore[no-untyped-def]
            for commands in super().steps():
                yield [c for c in commands if not isinstance(c, OptimizerStep)]

    return GradientsOnlySchedule


def gradients_only_schedule(engine: Any) -> Any:
    """`engine._train_schedule` for roundhouse: the optimizer step is `optimizer_step`'s."""
    return _gradients_only_class()(
        micro_batches=engine.micro_batches, stages=engine.num_stages, stage_id=engine.stage_id
    )


__all__ = ["PipelineStrategy"]
