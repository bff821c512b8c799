"""`ring`: data parallel with roundhouse's bucketed ring all-reduce, overlapped with backward.

Every rank holds the whole model and trains on its share of each global batch; gradients are
averaged over the ranks bucket by bucket while backward runs (see `roundhouse.parallel.ring`),
so with the loop's loss scaling every replica takes the step a single device would take on the
whole global batch. Model, optimizer and scheduler state are replicated: checkpoints hold rank
0's copy and load at any world size.

The default process group is created by whoever starts the workers (Ray Train, or the test
helper). With one worker no process group is needed and nothing is communicated.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.config import JobSpec
from roundhouse.errors import JobFileError, TrainingError
from roundhouse.models.sparse import sparse_modules
from roundhouse.parallel.base import StepStats, TrainPlan, loss_weight
from roundhouse.parallel.buckets import restore_held
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.ring import GradientReducer, OverlappedAllReduce, build_node_groups
from roundhouse.parallel.ring.costs import RingCosts
from roundhouse.parallel.ring.exact import ExactShardSum
from roundhouse.parallel.ring.section import RingStrategyConfig
from roundhouse.parallel.ring.sparse import gather_sparse_grads
from roundhouse.parallel.single import SingleDeviceStrategy
from roundhouse.parallel.timeouts import group_timeout, named_collective

logger = logging.getLogger(__name__)

WIRE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class RingStrategy(SingleDeviceStrategy):
    """Data parallel over all ranks; the single-device strategy plus gradient averaging."""

    kind = "ring"
    cost_model = RingCosts
    max_world_size = None
    supports_live_recovery = True
    config: RingStrategyConfig

    def __init__(self, config: RingStrategyConfig, ctx: WorkerContext) -> None:
        super().__init__(config, ctx)
        self.comm: OverlappedAllReduce | None = None
        self.gathered: list[nn.Parameter] = []  # sparse_gradients=gather: rows all-gathered
        self.gathered_bytes = 0
        self.exact: ExactShardSum | None = None  # strategy.exact: fixed-order shard sums
        self.distributed = ctx.world_size > 1
        if self.distributed:
            check_process_group(ctx)

    @classmethod
    def check_job(cls, job: JobSpec, world_size: int) -> None:
        """Exact mode: enough virtual shards, no accumulation, in-memory data.

        Raises:
            JobFileError: an exact-mode setting that cannot work (the field and the fix).
        """
        config = job.strategy
        if not config.exact:
            return
        if config.virtual_shards < world_size:
            raise JobFileError(
                f"strategy.virtual_shards={config.virtual_shards} is below the "
                f"{world_size} workers",
                f"set strategy.virtual_shards to at least {world_size}",
            )
        if job.trainer.grad_accum_steps != 1:
            raise JobFileError(
                "strategy.exact=true cuts each global batch into strategy.virtual_shards "
                f"micro-batches, so trainer.grad_accum_steps={job.trainer.grad_accum_steps} "
                "has no meaning",
                "set trainer.grad_accum_steps=1 (raise virtual_shards for smaller micro-batches)",
            )
        if config.sparse_gradients == "gather":
            raise JobFileError(
                "strategy.exact=true sums every gradient densely in shard order, so "
                "strategy.sparse_gradients=gather has no meaning",
                "set strategy.sparse_gradients=dense (or strategy.exact=false)",
            )
        if job.data.train is not None:
            raise JobFileError(
                "strategy.exact=true needs an in-memory training split, but data.train streams",
                "set strategy.exact=false, or use a data.source the loader holds in memory",
            )

    def setup(self, model: nn.Module, plan: TrainPlan) -> None:
        """Set up as `single`, then broadcast rank 0's weights and hook the gradient buckets."""
        super().setup(model, plan)
        if self.config.exact:
            self.exact = ExactShardSum(self.params, self.config.virtual_shards)
        if not self.distributed:
            return
        broadcast_module(self.model)
        if self.config.sparse_gradients == "gather":
            self.gathered = [m.weight for m in sparse_modules(self.model)]
        self.comm = self.build_comm()

    def build_comm(self) -> OverlappedAllReduce | None:
        """The overlapped bucket all-reduce (none in exact mode: shards are gathered)."""
        if self.exact is not None:
            return None
        reducer = build_reducer(self.config, self.ctx)
        reduced = [p for p in self.params if all(p is not t for t in self.gathered)]
        # cluster.recovery: live keeps each step's own gradients until it is applied, so
        # survivors of a lost peer redo only its share (`hold_gradient`)
        live = self.ctx.rendezvous is not None
        return OverlappedAllReduce(
            reduced, reducer, bucket_mb=self.config.bucket_mb, keep_local=live
        )

    def virtual_shards(self) -> int | None:
        """`strategy.virtual_shards` in exact mode."""
        return self.config.virtual_shards if self.config.exact else None

    def regroup(self, ctx: WorkerContext, *, joining: bool = False) -> None:
        """After live recovery re-formed the default group: new rank, world and buckets.

        `joining`: a replacement runs `setup` in this generation; match its collectives (the
        weights broadcast, then the gradient group).
        """
        self.close()
        self.ctx, self.distributed = ctx, ctx.world_size > 1
        if self.distributed:
            check_process_group(ctx)
            if joining:
                broadcast_module(self.model)
            self.comm = self.build_comm()

    def forward_backward(
        self, batch: dict[str, Tensor], *, loss_scale: float, sync: bool
    ) -> Tensor:
        """Forward and backward; the `sync` micro-batch averages its buckets over the ranks."""
        if self.exact is not None:
            return self._exact_forward_backward(batch, sync=sync)
        if self.comm is None or not sync:
            return super().forward_backward(batch, loss_scale=loss_scale, sync=sync)
        self.comm.begin()
        try:
            return super().forward_backward(batch, loss_scale=loss_scale, sync=sync)
        finally:
            # Even if backward failed, launch what is left: the other ranks' rings need it.
            self.comm.flush()

    def _exact_forward_backward(self, batch: dict[str, Tensor], *, sync: bool) -> Tensor:
        # The shard's own mean loss, unscaled: the shards are weighted when they are summed.
        assert self.exact is not None
        loss = super().forward_backward(batch, loss_scale=1.0, sync=sync)
        self.exact.stash(loss_weight(self.plan.task, batch))  # samples, or loss items
        if sync:
            self.exact.reduce(self.ctx.rank, self.ctx.world_size)
        return loss

    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """Wait for the averaged gradients, then step as `single` (identical on every rank)."""
        self._wait()
        if self.comm is not None:
            self.comm.forget()  # the step is applied: its own gradients are no longer needed
        if self.gathered:
            self.gathered_bytes += gather_sparse_grads(self.gathered, self.ctx.world_size)
        return super().optimizer_step(need_grad_norm=need_grad_norm)

    def zero_grad(self) -> None:
        """Wait for buckets in flight, then drop the gradients."""
        self._wait()  # a bucket still in flight would write its gradients back afterwards
        if self.exact is not None:
            self.exact.clear()
        super().zero_grad()

    def _wait(self) -> None:
        if self.comm is not None:
            self.comm.wait()

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank (an all-reduce of the minimum)."""
        if not self.distributed:
            return flag
        # Gradients first: a stalled peer then surfaces as the ring's error naming that peer.
        self._wait()
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.ctx.device)
        with named_collective("all_reduce (finite-loss check)"):
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def sum_over_replicas(self, value: float) -> float | None:
        """`value` summed over the ranks (one scalar all-reduce)."""
        if not self.distributed:
            return value
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.ctx.device)
        with named_collective("all_reduce (loss items of the step)"):
            dist.all_reduce(total)
        return float(total.item())

    def reduce_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """Sum each metric over all ranks (ranks without an evaluation share included)."""
        if not self.distributed:
            return super().reduce_metrics(sums)
        # A rank with an empty evaluation share has no keys at all; agree on the union first.
        keys: list[list[str] | None] = [None] * self.ctx.world_size
        with named_collective("all_gather_object (evaluation metrics)"):
            dist.all_gather_object(keys, sorted(sums))
        names = sorted({k for ks in keys for k in ks or []})
        zero = torch.zeros((), dtype=torch.float64)
        values = torch.stack([sums.get(k, zero).double().cpu() for k in names])
        values = values.to(self.ctx.device)
        with named_collective("all_reduce (evaluation metrics)"):
            dist.all_reduce(values)
        return dict(zip(names, values.cpu().tolist(), strict=True))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Wait for buckets in flight, then restore as `single`."""
        self._wait()
        super().load_state_dict(state)

    def hold_gradient(self) -> Any | None:
        """This rank's own gradients of the uncommitted step, as packed before the exchange
        (`OverlappedAllReduce(keep_local=True)`, under `cluster.recovery: live`); None unless
        every bucket of the step was copied. Stops the communication thread."""
        if self.comm is None or self.gathered:  # gathered rows are exchanged at the step
            return None
        self.comm.close()  # queued buckets copy their gradients before the thread stops
        held, self.comm = self.comm.held(), None
        return held

    def restore_gradient(self, held: Any, scale: float) -> None:
        """Set the gradients to `scale` times what `hold_gradient` returned."""
        restore_held(held, scale)

    def close(self) -> None:
        """Remove the bucket hooks and stop the communication thread."""
        if self.comm is not None:
            self.comm.close()
            self.comm = None


def check_process_group(ctx: WorkerContext) -> None:
    """More than one worker needs the launcher's default process group, of the right size."""
    if not dist.is_available() or not dist.is_initialized():
        raise TrainingError(
            f"strategy.kind=ring with {ctx.world_size} workers, but no torch.distributed "
            "process group is initialized in this worker",
            "start workers through roundhouse (Ray) or call dist.init_process_group first",
        )
    if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
        raise TrainingError(
            f"process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but the worker context says rank {ctx.rank} of {ctx.world_size}",
            "build the WorkerContext from the same launcher that created the process group",
        )


@torch.no_grad()
def broadcast_module(model: nn.Module) -> None:
    """Make every replica start from rank 0's parameters and buffers."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def build_reducer(config: RingStrategyConfig, ctx: WorkerContext) -> GradientReducer:
    """The reducer for the job: ring or native, flat or hierarchical, fp32 or bf16 wire.

    Gradients travel on their own process group, so the background thread's messages never
    interleave with the main thread's collectives (metrics, flags) on the default group.
    """
    wire = WIRE_DTYPES[config.grad_dtype]
    if config.hierarchical:
        groups = build_node_groups(ctx.node_rank, ctx.local_rank)
        return GradientReducer(config.algorithm, wire_dtype=wire, node_groups=groups)
    group = dist.new_group(list(range(ctx.world_size)), timeout=group_timeout())
    return GradientReducer(config.algorithm, wire_dtype=wire, group=group)
