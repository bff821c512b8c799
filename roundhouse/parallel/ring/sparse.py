"""Sparse gradients under `ring` with `sparse_gradients: gather`: all-gather the touched rows.

Each rank coalesces its sparse gradient (unique row ids, summed rows), the ranks all-gather
their row counts, then their ids and rows (padded to the longest), and every rank sums the
gathered rows into one sparse gradient divided by the world size: the same average the dense
all-reduce computes, moving `world x rows touched` rows instead of the whole table twice.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.parallel.timeouts import named_collective

logger = logging.getLogger(__name__)


def _gather_padded(tensor: Tensor, longest: int, world_size: int) -> list[Tensor]:
    """Every rank's `tensor` (first dimension padded to `longest` for the collective)."""
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(out, padded)
    return out


def gather_sparse_grad(param: nn.Parameter, world_size: int) -> int:
    """Replace `param.grad` (sparse, or None) by the average over the ranks; returns the
    bytes this rank received."""
    shape = param.shape
    if param.grad is None:
        rows = torch.zeros(0, dtype=torch.int64, device=param.device)
        values = torch.zeros((0, *shape[1:]), dtype=param.dtype, device=param.device)
    else:
        grad = param.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
    count = torch.tensor([rows.numel()], dtype=torch.int64, device=param.device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    with named_collective("all_gather (sparse gradient rows)"):
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        longest = max(sizes)
        all_rows = _gather_padded(rows, longest, world_size)
        all_values = _gather_padded(values, longest, world_size)
    if longest == 0:
        param.grad = None
        return 0
    rows = torch.cat([r[:n] for r, n in zip(all_rows, sizes, strict=True)])
    values = torch.cat([v[:n] for v, n in zip(all_values, sizes, strict=True)])
    param.grad = torch.sparse_coo_tensor(rows[None], values / world_size, shape).coalesce()
    return world_size * longest * (8 + values[0].numel() * values.element_size())


def gather_sparse_grads(params: Sequence[nn.Parameter], world_size: int) -> int:
    """`gather_sparse_grad` on each of `params`, in order (the same on every rank)."""
    return sum(gather_sparse_grad(p, world_size) for p in params)
