"""`ExactShardSum` on one rank: shard weights by their sample (or item) counts."""

from __future__ import annotations

import torch
from torch import nn

from roundhouse.parallel.ring.exact import ExactShardSum


def _stash(acc: ExactShardSum, layer: nn.Linear, grad: float, count: int) -> None:
    layer.weight.grad = torch.full_like(layer.weight, grad)
    layer.bias.grad = torch.full_like(layer.bias, grad)
    acc.stash(count)


def test_shards_weigh_by_their_counts() -> None:
    layer = nn.Linear(2, 1)
    acc = ExactShardSum(list(layer.parameters()), virtual_shards=2)
    _stash(acc, layer, 1.0, 3)
    _stash(acc, layer, 5.0, 1)
    acc.reduce(rank=0, world_size=1)
    assert torch.allclose(layer.weight.grad, torch.full_like(layer.weight, 2.0))  # (3 + 5) / 4
    assert torch.allclose(layer.bias.grad, torch.full_like(layer.bias, 2.0))


def test_a_global_batch_without_items_gives_a_zero_gradient() -> None:
    """Every shard counted 0 loss items (a masked LM that masked nothing): no division by
    zero, and the step's gradient is zero."""
    layer = nn.Linear(2, 1)
    acc = ExactShardSum(list(layer.parameters()), virtual_shards=2)
    _stash(acc, layer, 0.0, 0)
    _stash(acc, layer, 0.0, 0)
    acc.reduce(rank=0, world_size=1)
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    assert torch.equal(layer.bias.grad, torch.zeros_like(layer.bias))
