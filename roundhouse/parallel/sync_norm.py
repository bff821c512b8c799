"""`model.options.norm: sync_batch`: BatchNorm with the statistics of the global batch.

Under data parallelism each rank normalizes with its own small batch's mean and variance
(SEEDS S1:427-434, S3:753). `apply_sync_batch_norm` replaces every `BatchNorm2d` of the model
with a `GlobalBatchNorm` before the strategy takes the model, on every strategy (ring, ps,
DeepSpeed) alike: in training mode it all-reduces the per-channel sums over the process group,
so each rank normalizes with the mean and (biased) variance of the whole global batch (one
all-reduce of the per-channel Σx, Σx² and count per layer, in float64), and its
running statistics are the ones one process on the whole batch would keep.

The all-reduce is `torch.distributed.nn.functional.all_reduce`, which is differentiable: its
backward all-reduces the gradients of the statistics, so the parameter gradients are those of
the global batch too. It works on gloo (CPU) and NCCL alike; torch's own `SyncBatchNorm` refuses
CPU tensors. In eval mode (and with one worker) it is a plain `BatchNorm2d`. Its state dict is
`BatchNorm2d`'s, so checkpoints, export and `init_from` do not change.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.parallel.context import WorkerContext

logger = logging.getLogger(__name__)

SYNC_BATCH = "sync_batch"


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Differentiable sum over every rank of the default process group."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


class GlobalBatchNorm(nn.BatchNorm2d):
    """`BatchNorm2d` whose training statistics are those of the batch over every rank."""

    def forward(self, x: Tensor) -> Tensor:
        """Normalize `x` `(B, C, H, W)` with the global batch's per-channel statistics."""
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        dims, channels = [0, 2, 3], x.shape[1]
        # One all-reduce of Σx, Σx² and the count, in float64: E[x²] - E[x]² then loses nothing
        # that a second pass over the centred values would keep, at half the collectives.
        wide = x.double()
        count = wide.new_full((1,), x.numel() / max(channels, 1))
        totals = all_reduce_sum(torch.cat([wide.sum(dims), wide.square().sum(dims), count]))
        n = totals[-1]
        mean = totals[:channels] / n  # (C,)
        var = (totals[channels : 2 * channels] / n - mean.square()).clamp(min=0)  # biased
        self.update_running_stats(mean.detach(), var.detach(), n.detach())
        scale = torch.rsqrt(var + self.eps).to(x.dtype)
        out = (x - mean.to(x.dtype).view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """The running mean and unbiased variance, updated as `BatchNorm2d` updates them
        (tensor arithmetic only: no host sync on a GPU)."""
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # a cumulative moving average
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * (n / (n - 1.0).clamp(min=1.0))
        dtype = self.running_mean.dtype
        self.running_mean.mul_(1 - momentum).add_(mean.to(dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(dtype), alpha=momentum)


def to_global(module: nn.BatchNorm2d) -> GlobalBatchNorm:
    """A `GlobalBatchNorm` with a copy of `module`'s parameters, buffers and mode."""
    norm = GlobalBatchNorm(
        module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
    )
    device = next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
    norm.to(device)
    norm.load_state_dict(module.state_dict())
    norm.train(module.training)
    return norm


def apply_sync_batch_norm(model: nn.Module, norm: object, ctx: WorkerContext) -> int:
    """With `norm == "sync_batch"`, make every `BatchNorm2d` of `model` global, in place.

    Returns:
        How many layers were replaced (0 without `sync_batch`, or with one worker, where it
        equals `batch`: a warning says so).
    """
    if norm != SYNC_BATCH:
        return 0
    if ctx.world_size == 1 or not dist.is_initialized():
        logger.warning(
            "model.options.norm=sync_batch with one worker is the same as norm=batch: the "
            "batch statistics are already the whole batch's"
        )
        return 0
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not isinstance(m, GlobalBatchNorm)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, to_global(getattr(parent, child)))
    logger.info("sync_batch: %d BatchNorm layers normalize with the global batch", len(names))
    return len(names)
