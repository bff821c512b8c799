"""`deepspeed`: ZeRO data parallel (stages 0-3, CPU offload), pipeline, tensor and expert parallel.

The engine is DeepSpeed's; the optimizer and LR schedule are roundhouse's (the job's torch
optimizer and `LambdaLR`, handed to `deepspeed.initialize` as factories), so every ZeRO stage
takes the same steps as `single` on the same global batch. The ds_config is generated from the
job (`deepspeed_config.py`); `strategy.config` adds raw keys.

Gradient accumulation follows the loop: `forward_backward(sync=False)` only accumulates
(`set_gradient_accumulation_boundary(False)`), the micro-batch with `sync=True` is the boundary
where ZeRO reduces, and `optimizer_step` calls `engine.step()` once. The loop's `loss_scale`
already includes the micro-batch share and the data-parallel size, so backward runs with
`scale_wrt_gas=False` and DeepSpeed's averaging over the data-parallel ranks gives the gradient
of the global batch's mean loss.

Checkpoints are world-size independent (`deepspeed_state.py`): consolidated weights and
per-parameter optimizer state in `torch.optim` layout, re-partitioned on load, so a run resumes
at any data-parallel size for every ZeRO stage.

The workers' default process group (Ray Train, the test helper) comes first; DeepSpeed's
communication layer wraps it. With one worker and no process group (`--local`) the strategy
creates a one-rank group (gloo; nccl on CUDA) on 127.0.0.1 and destroys it in `close()`.

`import deepspeed` happens only inside this module's functions: `import roundhouse` never
imports it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.config import JobSpec
from roundhouse.errors import JobFileError, TrainingError
from roundhouse.parallel.base import StepStats, Strategy, TrainPlan, move_to
from roundhouse.parallel.compile import compile_engine
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.deepspeed.config import (
    EngineOptions,
    build_ds_config,
    check_layout,
)
from roundhouse.parallel.deepspeed.config import check_job as check_deepspeed_job
from roundhouse.parallel.deepspeed.costs import DeepSpeedCosts
from roundhouse.parallel.deepspeed.moe import (
    apply_deepspeed_moe,
    is_expert_name,
    merge_expert_groups,
    widen_groups,
)
from roundhouse.parallel.deepspeed.section import DeepSpeedStrategyConfig
from roundhouse.parallel.deepspeed.state import (
    ZeroState,
    from_torch_layout,
    to_torch_layout,
)
from roundhouse.parallel.deepspeed.tensor_parallel import apply_tensor_parallel, tp_grad_norm
from roundhouse.parallel.net import free_port

logger = logging.getLogger(__name__)


class DeepSpeedStrategy(Strategy):
    """Trains through a `DeepSpeedEngine`; see the module docstring for the contract."""

    kind = "deepspeed"
    cost_model = DeepSpeedCosts
    config: DeepSpeedStrategyConfig

    @classmethod
    def check_job(cls, job: JobSpec, world_size: int) -> None:
        """Topology, raw-vs-typed ds_config and model checks (`config.check_job`).

        Raises:
            JobFileError: The DeepSpeed layout or config cannot work (field and fix named).
            ModelError: The model lacks what the layout needs (pipeline layers, experts).
        """
        check_deepspeed_job(job, world_size)

    @classmethod
    def check_optimizers(cls, job: JobSpec, names: list[str]) -> None:
        """Several optimizers: one engine each over a shared module, ZeRO stages 0-2 only.

        ZeRO-3 gathers parameters in the engine's forward hooks (a task calling a submodule
        directly would see empty tensors, and two engines would partition the same module
        twice); pipeline, tensor and expert parallel engines own the whole model's layout;
        offload has not been verified with several engines.

        Raises:
            JobFileError: The layout is one of those.
        """
        if len(names) < 2:
            return
        s = job.strategy
        refused = [
            (s.zero_stage == 3, "strategy.zero_stage=3", "zero_stage 0, 1 or 2"),
            (s.pipeline_stages > 1, "strategy.pipeline_stages>1", "pipeline_stages=1"),
            (s.tensor_parallel > 1, "strategy.tensor_parallel>1", "tensor_parallel=1"),
            (s.expert_parallel > 1, "strategy.expert_parallel>1", "expert_parallel=1"),
            (
                s.offload_optimizer != "none" or s.offload_params != "none",
                "strategy offload",
                "offload_optimizer=none and offload_params=none",
            ),
        ]
        for bad, what, fix in refused:
            if bad:
                raise JobFileError(
                    f"{what} does not work with a task that steps several optimizers "
                    f"({', '.join(names)})",
                    f"use {fix}, or strategy.kind=ring",
                )

    def __init__(self, config: DeepSpeedStrategyConfig, ctx: WorkerContext) -> None:
        super().__init__(config, ctx)
        check_layout(config, self.topology)
        self.owns_process_group = False
        self.engine: Any = None
        self.tp_group: Any = None
        self.dp_group: Any = None
        self.model_hooks: list[Any] = []  # apply_* results that translate checkpoint names

    # --- topology ---------------------------------------------------------------------------

    @property
    def data_parallel_rank(self) -> int:
        # Tensor parallel ranks are adjacent (rank = dp_rank * tp + tp_rank); pipeline stages
        # are the slow axis of DeepSpeed's topology (rank = stage * dp + dp_rank).
        """This worker's index among the data-parallel replicas."""
        if self.config.pipeline_stages > 1:
            return self.ctx.rank % self.data_parallel_size
        return self.ctx.rank // self.config.tensor_parallel

    # --- setup ------------------------------------------------------------------------------

    def setup(self, model: nn.Module, plan: TrainPlan) -> None:
        """Join DeepSpeed's process groups, apply tensor/expert parallel and build the engine."""
        self.plan = plan
        self.owns_process_group = init_deepspeed_dist(self.ctx)
        self.build_groups()
        model = model.to(self.ctx.device)
        self.canonical = [n for n, p in model.named_parameters() if p.requires_grad]
        self.aliases = tied_aliases(model)
        self.model = self.apply_parallelism(model)
        self.engine = self.build_engine(self.model, plan)
        self.zero = ZeroState(self.engine, self.config.zero_stage)

    def build_groups(self) -> None:
        """The data-parallel group (and tensor-parallel group) of this rank."""
        tp, world = self.config.tensor_parallel, self.ctx.world_size
        if tp == 1 or self.config.pipeline_stages > 1:
            self.dp_group = None  # the default group (pipeline: built by the pipe strategy)
            return
        for start in range(0, world, tp):
            group = dist.new_group(list(range(start, start + tp)))
            if start <= self.ctx.rank < start + tp:
                self.tp_group = group
        for tp_rank in range(tp):
            group = dist.new_group(list(range(tp_rank, world, tp)))
            if self.ctx.rank % tp == tp_rank:
                self.dp_group = group

    def apply_parallelism(self, model: nn.Module) -> nn.Module:
        """Tensor- or expert-parallel rewrites of the model, in place (parallelism stays here)."""
        if self.config.tensor_parallel > 1:
            self.model_hooks.append(apply_tensor_parallel(model, self.tp_group))
        if self.config.expert_parallel > 1:
            self.model_hooks.append(apply_deepspeed_moe(model, self.config.expert_parallel))
        return model

    def ds_config(self, plan: TrainPlan) -> dict[str, Any]:
        """The ds_config of this worker's job (batch arithmetic from its `topology`)."""
        options = EngineOptions(plan.grad_clip_norm, plan.autocast_dtype == torch.bfloat16)
        return build_ds_config(self.config, self.topology, options)

    def param_groups(self, model: nn.Module) -> list[Any]:
        """Parameters for the optimizer factory (MoE: split as DeepSpeed requires)."""
        params = [p for p in model.parameters() if p.requires_grad]
        if self.config.expert_parallel > 1:
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            return split_params_into_different_moe_groups_for_optimizer(
                [{"params": params, "name": "dense"}]
            )
        return params

    def build_engine(self, model: nn.Module, plan: TrainPlan) -> Any:
        """`deepspeed.initialize` with roundhouse's optimizer and scheduler as client factories."""
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=self.param_groups(model),
            optimizer=plan.build_optimizer,
            lr_scheduler=plan.build_scheduler,
            config=self.ds_config(plan),
            dist_init_required=False,
        )
        return engine

    def compile(self, mode: str) -> None:
        """`trainer.compile`: DeepSpeed's own `engine.compile()`."""
        compile_engine(self.engine, mode)

    # --- training ---------------------------------------------------------------------------

    def train_mode(self, training: bool) -> None:
        """Switch the engine between training and evaluation behaviour."""
        self.engine.train(training)

    def forward_backward(
        self, batch: dict[str, Tensor], *, loss_scale: float, sync: bool
    ) -> Tensor:
        """Forward and backward through the engine; `sync` marks the accumulation boundary."""
        batch = self.engine_batch(batch)
        self.engine.set_gradient_accumulation_boundary(sync)
        outputs = self.plan.task.forward(self.engine, batch)
        loss = self.plan.task.loss(outputs, batch)
        self.engine.backward(loss * loss_scale, scale_wrt_gas=False)
        return loss.detach()

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Model outputs for evaluation, without gradients."""
        return self.plan.task.forward(self.engine, self.engine_batch(batch))

    def engine_batch(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`batch` on this worker's device; with `bf16` the engine's weights are bf16 (no
        autocast), so floating-point inputs are cast to match (integer ids and labels stay)."""
        batch = move_to(batch, self.ctx.device)
        if self.plan.autocast_dtype != torch.bfloat16:
            return batch
        return {k: v.bfloat16() if v.is_floating_point() else v for k, v in batch.items()}

    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """`engine.step()` once per optimizer step; report the global norm and lr."""
        lr = self.zero.base.param_groups[0]["lr"]
        norm = None
        if self.config.zero_stage == 0 and need_grad_norm:
            norm = self.plain_grad_norm()
        self.engine.step()
        if self.config.zero_stage > 0 and need_grad_norm:
            value = self.engine.get_global_grad_norm()
            norm = float(value) if value is not None else None
        return StepStats(grad_norm=norm, lr=lr, extra=self.step_metrics())

    def plain_grad_norm(self) -> float:
        """Global gradient norm without ZeRO (gradients are already averaged)."""
        if self.config.tensor_parallel > 1:  # shards on every tp rank, replicas once
            return tp_grad_norm(self.engine.module, self.model_hooks[0])
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))

    def step_metrics(self) -> dict[str, float]:
        """Extra `train/*` metrics from the model hooks (e.g. MoE expert token counts)."""
        metrics: dict[str, float] = {}
        for hook in self.model_hooks:
            metrics.update(getattr(hook, "step_metrics", dict)())
        return metrics

    def zero_grad(self) -> None:
        """Drop the accumulated gradients (a skipped, non-finite step)."""
        self.engine.zero_grad()

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank."""
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.ctx.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def sum_over_replicas(self, value: float) -> float | None:
        """`value` summed over the data-parallel ranks (one scalar all-reduce)."""
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(total, group=self.dp_group)
        return float(total.item())

    def reduce_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        # Model-parallel ranks of one replica computed the same sums: add data-parallel only.
        """Sum each metric over the data-parallel ranks."""
        keys: list[list[str] | None] = [None] * self.ctx.world_size
        dist.all_gather_object(keys, sorted(sums))
        names = sorted({k for ks in keys for k in ks or []})
        zero = torch.zeros((), dtype=torch.float64)
        values = torch.stack([sums.get(k, zero).double().cpu() for k in names]).to(self.ctx.device)
        dist.all_reduce(values, group=self.dp_group)
        return dict(zip(names, values.cpu().tolist(), strict=True))

    # --- state ------------------------------------------------------------------------------

    def local_named_params(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) pairs this rank trains, named as in the model's state_dict."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def gather_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Full weights (parameters and buffers) and per-parameter optimizer state."""
        weights, state = self.zero.gather(self.local_named_params())
        for name, buffer in self.model.named_buffers():
            weights[name] = buffer.detach().cpu().clone()
        weights.update(self.frozen_weights())
        for hook in self.model_hooks:
            weights, state = hook.consolidate(weights, state)
        for alias, name in self.aliases.items():  # a tied weight under each of its names,
            weights[alias] = weights[name]  # as model.state_dict() has it
        return weights, state

    def state_dict(self) -> dict[str, Any]:
        """World-size independent state: consolidated weights and torch-layout optimizer state."""
        weights, state = self.gather_state()
        order = [n for n in self.canonical if n in weights]
        model = self.ordered_model_state(weights)
        optimizer = to_torch_layout(state, self.zero.param_groups(), order, self.group_of())
        scheduler = self.engine.lr_scheduler.state_dict()
        if self.config.expert_parallel > 1:  # the user's one group, as `single` saves it
            optimizer, scheduler = merge_expert_groups(optimizer, scheduler)
        return {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    def ordered_model_state(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """`weights` with the trainable parameters first, in the original model's order."""
        return dict(sorted(weights.items(), key=lambda kv: self.canonical_index(kv[0])))

    def canonical_index(self, name: str) -> int:
        """Position of each parameter name in the model's canonical (unwrapped) order."""
        try:
            return self.canonical.index(name)
        except ValueError:
            return len(self.canonical)

    def group_of(self) -> dict[str, int]:
        """Which optimizer group each parameter is in (MoE splits expert parameters; the job's
        `param_groups` make their own)."""
        if self.config.expert_parallel == 1:
            return getattr(self.plan.build_optimizer, "live_group_of", dict)()

        return {n: 1 if is_expert_name(n) else 0 for n in self.canonical}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint saved at any world size, re-partitioned for this one."""
        order = list(state["model"])
        order = [n for n in self.canonical if n in state["model"]] or order
        named_state, groups = from_torch_layout(state["optimizer"], order)
        weights, named_state = dict(state["model"]), named_state
        for hook in reversed(self.model_hooks):
            weights, named_state = hook.partition(weights, named_state)
        self.load_local(weights, named_state)

        # One saved group (`single`, merged MoE groups) serves every live group.
        live = len(self.zero.base.param_groups)
        groups, scheduler = widen_groups(groups, state["scheduler"], live)
        self.zero.set_param_groups(groups)
        self.engine.lr_scheduler.load_state_dict(scheduler)

    def load_local(self, weights: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Load consolidated weights and optimizer state into this rank's partition."""
        named = self.local_named_params()
        missing = [n for n, _ in named if n not in weights]
        if missing:
            raise KeyError(f"checkpoint has no weights for {missing[0]}")
        self.zero.load(named, weights, state)
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                if name in weights:
                    buffer.copy_(weights[name])
        self.load_frozen(weights)

    def frozen(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters nobody trains (`trainer.freeze`): outside ZeRO's optimizer state."""
        return [(n, p) for n, p in self.model.named_parameters() if not p.requires_grad]

    def frozen_weights(self) -> dict[str, Tensor]:
        """Full copies of the frozen parameters (ZeRO-3 partitions them too: gathered)."""
        import deepspeed

        named = self.frozen()
        stage3 = self.config.zero_stage == 3 and bool(named)
        with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=stage3):
            return {n: p.detach().cpu().clone() for n, p in named}

    def load_frozen(self, weights: dict[str, Tensor]) -> None:
        """Copy the frozen tensors named in `weights` into the model (gathered under ZeRO-3)."""
        import deepspeed

        named = [(n, p) for n, p in self.frozen() if n in weights]
        stage3 = self.config.zero_stage == 3 and bool(named)
        params = [p for _, p in named]
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=stage3)
        with gathered, torch.no_grad():
            for name, param in named:
                param.copy_(weights[name].to(param.dtype))

    def model_state_dict(self) -> dict[str, Tensor]:
        """The consolidated model weights, as the unwrapped model names them."""
        return self.gather_state()[0]

    def close(self) -> None:
        """Release the engine and a process group this strategy created."""
        self.engine = None
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """`{alias: name}` for tensors that `model.state_dict()` lists under several names.

    `named_parameters()` yields a tied weight (GPT's embedding and output layer) once; a
    checkpoint must hold it under every name so that plain `load_state_dict` accepts it.
    """
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def init_deepspeed_dist(ctx: WorkerContext) -> bool:
    """Point DeepSpeed's communication layer at the workers' process group.

    Creates a one-rank gloo group when there is none (one worker, `--local`); returns whether
    it did (the strategy then destroys it on close).
    """
    if ctx.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    created = False
    if not dist.is_initialized():
        if ctx.world_size != 1:
            raise TrainingError(
                f"strategy.kind=deepspeed with {ctx.world_size} workers, but no "
                "torch.distributed process group is initialized in this worker",
                "start workers through roundhouse (Ray) or call dist.init_process_group first",
            )
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
        created = True
    env = {
        "RANK": ctx.rank,
        "LOCAL_RANK": ctx.local_rank,
        "WORLD_SIZE": ctx.world_size,
        "LOCAL_WORLD_SIZE": ctx.local_world_size,
    }
    for key, value in env.items():
        os.environ[key] = str(value)  # DeepSpeed reads them; the launcher may not set them
    import deepspeed

    if ctx.device.type == "cpu":
        skip_shared_memory_op()
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    return created


def skip_shared_memory_op() -> None:
    """Keep DeepSpeed's CPU backend from JIT-building its shared-memory all-reduce op.

    `init_distributed` on the CPU accelerator compiles `deepspeed_shm_comm` (about 45 s, and
    it needs g++) on first use. Only `inference_all_reduce` calls it: DeepSpeed's inference
    kernels and AutoTP's layers in inference mode. Training all-reduces through
    `torch.distributed` (gloo) either way, and without the op `inference_all_reduce` falls
    back to the same gloo all-reduce. DeepSpeed keeps the probed table of compatible ops in
    one dict that stays edited (deepspeed/ops/__init__.py), which is the switch used here.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


__all__ = ["DeepSpeedStrategy", "init_deepspeed_dist"]
