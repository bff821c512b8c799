"""Tensor (model) parallel for the DeepSpeed strategy: DeepSpeed AutoTP with roundhouse's specs.

`strategy.tensor_parallel = tp > 1` puts `tensor_parallel: {autotp_size: tp, partition_config:
...}` into the ds_config (`autotp_section`), and `deepspeed.initialize` shards the model in place
with DeepSpeed's AutoTP training layers (Megatron-style):

- attention q/k/v maps and the MLP's first linear (`fc1`, experts' too) are column parallel
  (`LinearLayer`): rank r keeps rows `r * out/tp ...` of weight and bias, i.e. heads
  `r * H/tp ...`; the input's gradient is all-reduced over the tp group in backward;
- the attention output map and the MLP's second linear (`fc2`) are row parallel
  (`LinearAllreduce`): rank r keeps columns of the weight, the partial outputs are all-reduced
  in forward (identity in backward), the bias is replicated and added once after the sum;
- AutoTP divides the attention module's `num_heads` attribute by tp, so each rank attends with
  its own heads at the full head width. Embeddings, LayerNorms, routers and heads stay
  replicated; the collectives above make their gradients identical on every tp rank.

Tensor parallel ranks are adjacent (rank = dp_rank * tp + tp_rank), as DeepSpeed's
(data_parallel, tensor_parallel) device mesh lays them out, and they read the same batches
(the loop shards data by data-parallel rank). ZeRO partitions over the data-parallel group.

`TensorParallelHook` keeps checkpoints world-size independent: `consolidate` all-gathers the
shards of every split parameter, and of its per-parameter optimizer state, over the tp group
into the full tensors `single` saves; `partition` keeps this rank's slice at load.

Only the DeepSpeed strategy uses this module; deepspeed is imported lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.errors import TrainingError

logger = logging.getLogger(__name__)

# DeepSpeed AutoTP layer specs for roundhouse's transformer layers (gpt, bert, moe).
COLUMN_PATTERNS = [r".*\.attn\.[qkv]_proj\.weight$", r".*\.fc1\.weight$"]
ROW_PATTERNS = [r".*\.attn\.out_proj\.weight$", r".*\.fc2\.weight$"]
SUPPORTED_MODELS = ("gpt", "bert", "moe")


def autotp_section(tp_size: int) -> dict[str, Any]:
    """The ds_config `tensor_parallel` section for roundhouse's models (no deepspeed import)."""
    return {
        "autotp_size": tp_size,
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": ROW_PATTERNS, "partition_type": "row"},
                {"patterns": COLUMN_PATTERNS, "partition_type": "column"},
            ],
        },
    }


@dataclass(frozen=True)
class Split:
    """How one parameter is split over the tp group: along `dim`, in `sizes` (rank order)."""

    dim: int
    sizes: tuple[int, ...]


def apply_tensor_parallel(model: nn.Module, tp_group: Any) -> TensorParallelHook:
    """Checks that `model` has layers AutoTP will split and returns the checkpoint hook.

    The sharding itself happens in `deepspeed.initialize` (ds_config `tensor_parallel`), in
    place on `model`; the hook reads the resulting layers lazily.

    Raises:
        TrainingError: no attention or MLP linear matches the tensor-parallel layer specs.
    """
    import re

    patterns = [re.compile(p) for p in COLUMN_PATTERNS + ROW_PATTERNS]
    names = [n for n, _ in model.named_parameters() if any(p.match(n) for p in patterns)]
    if not names:
        raise TrainingError(
            f"strategy.tensor_parallel: model {type(model).__name__} has no attention "
            "(attn.q_proj/k_proj/v_proj/out_proj) or MLP (fc1/fc2) linears to split",
            f"use one of {', '.join(SUPPORTED_MODELS)} or set strategy.tensor_parallel=1",
        )
    return TensorParallelHook(model, tp_group)


class TensorParallelHook:
    """Translates between this rank's shards and full tensors (see the module docstring).

    Args:
        model: the model DeepSpeed's AutoTP shards in place (read after `initialize`).
        tp_group: this rank's tensor-parallel process group.
    """

    def __init__(self, model: nn.Module, tp_group: Any) -> None:
        self.model = model
        self.group = tp_group
        self._splits: dict[str, Split] | None = None

    @property
    def tp_rank(self) -> int:
        """This rank's index in its tensor-parallel group."""
        return dist.get_rank(group=self.group)

    def splits(self) -> dict[str, Split]:
        """`{parameter name: Split}` of every sharded parameter (same on all tp ranks)."""
        if self._splits is None:
            self._splits = find_splits(self.model)
        return self._splits

    def consolidate(self, weights: dict[str, Tensor], state: dict[str, Any]) -> tuple[dict, dict]:
        """This rank's shards -> full tensors (collective over the tp group)."""
        weights, state = dict(weights), {k: dict(v) for k, v in state.items()}
        for name, split in sorted(self.splits().items()):
            shape = weights[name].shape
            weights[name] = self.gather(weights[name], split)
            for key, value in sorted(state.get(name, {}).items()):
                if torch.is_tensor(value) and value.shape == shape:
                    state[name][key] = self.gather(value, split)
        return weights, state

    def partition(self, weights: dict[str, Tensor], state: dict[str, Any]) -> tuple[dict, dict]:
        """Full tensors -> this rank's shards (local, no communication)."""
        weights, state = dict(weights), {k: dict(v) for k, v in state.items()}
        for name, split in self.splits().items():
            full = weights[name].shape
            weights[name] = self.slice(weights[name], split)
            for key, value in state.get(name, {}).items():
                if torch.is_tensor(value) and value.shape == full:
                    state[name][key] = self.slice(value, split)
        return weights, state

    def gather(self, shard: Tensor, split: Split) -> Tensor:
        """All shards of one tensor, concatenated along the split dimension."""
        shard = shard.contiguous()
        parts = [shard.new_empty(self.shard_shape(shard, split, s)) for s in split.sizes]
        dist.all_gather(parts, shard, group=self.group)
        return torch.cat(parts, dim=split.dim)

    def slice(self, full: Tensor, split: Split) -> Tensor:
        """This rank's part of `full`."""
        if full.shape[split.dim] != sum(split.sizes):
            raise KeyError(
                f"checkpoint tensor of shape {tuple(full.shape)} does not split into "
                f"{split.sizes} along dim {split.dim}"
            )
        return full.split(list(split.sizes), dim=split.dim)[self.tp_rank].clone()

    @staticmethod
    def shard_shape(shard: Tensor, split: Split, size: int) -> list[int]:
        """The shape of this rank's slice of the parameter `name`."""
        shape = list(shard.shape)
        shape[split.dim] = size
        return shape


def find_splits(model: nn.Module) -> dict[str, Split]:
    """The split of every parameter of AutoTP's column (`LinearLayer`) and row
    (`LinearAllreduce`) layers in `model`; a row layer's bias is replicated."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    splits: dict[str, Split] = {}
    for prefix, module in model.named_modules():
        sizes = tuple(getattr(module, "_partition_sizes", ()))
        if isinstance(module, LinearLayer):
            splits[f"{prefix}.weight"] = Split(0, sizes)
            if module.bias is not None:
                splits[f"{prefix}.bias"] = Split(0, sizes)
        elif isinstance(module, LinearAllreduce):
            splits[f"{prefix}.weight"] = Split(1, sizes)
    return splits


def tp_grad_norm(model: nn.Module, hook: TensorParallelHook) -> float:
    """Global L2 norm of the (already data-parallel averaged) gradients of a tp-split model.

    Shards count on every tp rank, replicated parameters once (tp rank 0): the squares are
    summed over the tp group.
    """
    split = hook.splits()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for name, param in model.named_parameters():
        if param.grad is None or (name not in split and hook.tp_rank != 0):
            continue
        total += param.grad.detach().double().pow(2).sum()
    dist.all_reduce(total, group=hook.group)
    return float(total.sqrt())


__all__ = [
    "SUPPORTED_MODELS",
    "TensorParallelHook",
    "apply_tensor_parallel",
    "autotp_section",
    "tp_grad_norm",
]
