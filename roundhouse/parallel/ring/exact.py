"""`strategy.exact`: gradients summed over fixed virtual shards in a fixed order.

The global batch is cut into V shards whatever the world size (`StepLoader`'s
`virtual_shards`); each rank takes a contiguous run of them. Per shard the rank keeps the
gradient of the shard's mean loss (`stash`), flattened, with the shard's sample count (or its
loss items, for a task whose loss is a mean over them: `Task.loss_items`). At the
synchronising micro-batch every rank all-gathers every shard's gradient and adds them in
shard order, each weighted by its share of the global batch (`reduce`). The additions happen
in the same order on the same numbers whatever the number of ranks, so the weights do not
depend on how many workers were alive at each step: 1, 2 or 3 workers end bit-identical.
The price: each step moves V gradients instead of one average (memory and traffic grow with V).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.data.sampler import chunk_bounds
from roundhouse.parallel.timeouts import named_collective

logger = logging.getLogger(__name__)


class ExactShardSum:
    """Keeps this rank's per-shard gradients and sums all shards in a fixed order.

    Args:
        params: the trainable parameters (every rank: same list and order).
        virtual_shards: V, the shards per global batch.
    """

    def __init__(self, params: Sequence[nn.Parameter], virtual_shards: int) -> None:
        self.params = list(params)
        self.virtual_shards = virtual_shards
        self.slots: list[Tensor] = []  # flat gradient of each shard, its sample count last

    def stash(self, num_samples: int) -> None:
        """Take the gradient the last backward left (one shard's mean loss) and clear it."""
        parts = [
            p.grad.detach().reshape(-1).float() if p.grad is not None else p.new_zeros(p.numel())
            for p in self.params
        ]
        count = torch.tensor([float(num_samples)], device=parts[0].device)
        self.slots.append(torch.cat([*parts, count]))
        for p in self.params:
            p.grad = None

    def reduce(self, rank: int, world_size: int) -> None:
        """Every shard's gradient, weighted by its share of the batch, summed in shard order,
        into the parameters' `.grad` (every rank: the same bits)."""
        counts = [hi - lo for lo, hi in chunk_bounds(self.virtual_shards, world_size)]
        assert len(self.slots) == counts[rank], (len(self.slots), counts, rank)
        local = torch.stack(self.slots)
        pad = max(counts) - local.shape[0]
        if pad:
            local = torch.cat([local, local.new_zeros(pad, local.shape[1])])
        gathered = [local]
        if world_size > 1:
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            with named_collective("all_gather (exact shard gradients)"):
                dist.all_gather(gathered, local)
        shards = [gathered[r][i] for r in range(world_size) for i in range(counts[r])]
        # A global batch with no loss items (nothing masked, only padding) has a zero gradient.
        total_samples = max(sum(float(s[-1]) for s in shards), 1.0)
        total = shards[0][:-1] * (float(shards[0][-1]) / total_samples)
        for shard in shards[1:]:
            total += shard[:-1] * (float(shard[-1]) / total_samples)
        self._unflatten(total)
        self.slots = []

    def _unflatten(self, flat: Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def clear(self) -> None:
        """Drop stashed shards (a skipped step)."""
        self.slots = []
