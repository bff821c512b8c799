"""A model's footprint from one trace on the meta device: no weights are allocated.

`profile_model` builds the job's model under `torch.device("meta")`, runs one forward pass and
the task's loss on a meta micro-batch with autograd on, and records

- FLOPs with `torch.utils.flop_counter.FlopCounterMode` (forward; a training step's backward
  costs twice the forward's matmul FLOPs, so a step is 3x forward);
- activation memory as the bytes of the distinct storages autograd saves for backward
  (`torch.autograd.graph.saved_tensors_hooks`), parameters excluded;
- per pipeline layer (when the model has `pipeline_layers`): parameters, forward FLOPs, saved
  bytes and the bytes of the activation it hands to the next layer (what a pipeline stage
  boundary sends).

Meta tensors have shapes and storages but no data, so a 1.3B-parameter model is traced in
seconds with no memory. Figures are per sample: FLOPs and activations are linear in the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from roundhouse.models.sparse import sparse_modules
from roundhouse.parallel.costs.profile import LayerProfile, ModelProfile

logger = logging.getLogger(__name__)

TRACE_BATCH = 2  # samples in the traced micro-batch (any size works: figures are per sample)


class SavedTensorMeter:
    """Sums distinct storages autograd saves, excluding `exclude` (the parameters)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.sizes: dict[int, int] = {}

    def pack(self, tensor: Tensor) -> Tensor:
        """Count a saved tensor's storage (parameters excluded); return the tensor unchanged."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.exclude:
            self.sizes[key] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        """Bytes of every distinct saved storage so far."""
        return sum(self.sizes.values())

    @property
    def largest(self) -> int:
        """Bytes of the largest saved storage so far."""
        return max(self.sizes.values(), default=0)


def largest_layer_params(model: nn.Module) -> int:
    """Parameters of the largest module counting only its own (not its children's)."""
    sizes = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return max(sizes, default=0)


def make_batch(
    task_kind: str, input_shape: tuple[int, ...], dtype: torch.dtype, batch: int, num_classes: int
) -> dict[str, Tensor]:
    """A meta micro-batch the task's `forward` and `loss` accept."""
    if dtype.is_floating_point:
        inputs = torch.empty(batch, *input_shape, dtype=dtype, device="meta")
    else:
        inputs = torch.randint(0, num_classes, (batch, *input_shape), device="meta")
    target_shape = (
        (batch, *input_shape) if task_kind in ("language_model", "masked_lm") else (batch,)
    )
    target = torch.randint(0, num_classes, target_shape, device="meta")
    return {"input": inputs, "target": target}


def run_loss(task: Any, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The task's training loss on `batch`; the mean output where the task needs more keys."""
    try:
        return task.loss(task.forward(model, batch), batch)
    except (KeyError, TypeError):
        out = model(batch["input"])
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.float().mean()


class LayerChain(nn.Module):
    """`pipeline_layers` applied in sequence, recording each layer's saved and output bytes."""

    def __init__(
        self, layers: list[nn.Module], meter: SavedTensorMeter, flops: Callable[[], float]
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.meter = meter
        self.flops = flops  # the running FLOP count of the trace
        self.records: list[tuple[float, float, float]] = []

    def forward(self, x: Tensor) -> Tensor:
        """Run the layers in order, recording each one's saved bytes and FLOPs."""
        for layer in self.layers:
            before, flops_before = self.meter.total, self.flops()
            x = layer(x)
            out_bytes = x.numel() * x.element_size() if isinstance(x, Tensor) else 0
            self.records.append((self.meter.total - before, out_bytes, self.flops() - flops_before))
        return x


def layer_profiles(chain: LayerChain, batch_size: int) -> list[LayerProfile]:
    """Per-sample `LayerProfile`s from a chain that ran once; a shared weight counts once."""
    seen: set[int] = set()
    profiles = []
    for layer, (saved, out, flops) in zip(chain.layers, chain.records, strict=True):
        params = [p for p in layer.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        n = sum(p.numel() for p in params)
        profiles.append(LayerProfile(n, saved / batch_size, out / batch_size, flops / batch_size))
    return profiles


def has_tied_layers(layers: list[nn.Module]) -> bool:
    """Whether two pipeline layers share a parameter."""
    owners: dict[int, int] = {}
    for index, layer in enumerate(layers):
        for p in layer.parameters():
            if owners.setdefault(id(p), index) != index:
                return True
    return False


TP_NAMES = (".attn.q_proj.", ".attn.k_proj.", ".attn.v_proj.", ".attn.out_proj.", ".fc1.", ".fc2.")


def split_fractions(model: nn.Module) -> tuple[float, int]:
    """(share of parameters tensor parallel splits, parameters inside experts)."""
    total = tp = experts = 0
    for name, p in model.named_parameters():
        total += p.numel()
        dotted = f".{name}"
        tp += p.numel() if any(key in dotted for key in TP_NAMES) else 0
        experts += p.numel() if ".experts." in dotted else 0
    return (tp / total if total else 0.0), experts


def profile_model(
    model: nn.Module,
    task: Any,
    batch: dict[str, Tensor],
    pipeline_layers: Any = None,
    model_kwargs: dict[str, Any] | None = None,
) -> ModelProfile:
    """Trace `model` (built on the meta device) for one micro-batch; see the module doc."""
    kwargs = model_kwargs or {}
    meter = SavedTensorMeter({p.untyped_storage()._cdata for p in model.parameters()})
    layers = list(pipeline_layers(model)) if pipeline_layers is not None else []
    counter = FlopCounterMode(display=False)
    traced = LayerChain(layers, meter, counter.get_total_flops) if layers else model
    num = batch["input"].shape[0]
    lookups = RowLookups(model)
    with counter, torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        run_loss(task, traced, batch)
    lookups.close()
    tp_fraction, expert_params = split_fractions(model)
    input_shape = tuple(batch["input"].shape[1:])
    return ModelProfile(
        num_params=sum(p.numel() for p in model.parameters()),
        largest_layer_params=largest_layer_params(model),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        fwd_flops=counter.get_total_flops() / num,
        saved_bytes=meter.total / num,
        largest_saved_bytes=meter.largest / num,
        tp_param_fraction=tp_fraction,
        expert_params=expert_params,
        num_experts=int(kwargs.get("num_experts", 0) or 0),
        layers=layer_profiles(traced, num) if layers else [],
        tied_across_layers=has_tied_layers(layers),
        num_heads=int(kwargs.get("num_heads", 0)) if tp_fraction else 0,
        tokens_per_sample=input_shape[0] if len(input_shape) == 1 else 1,
        hidden_dim=int(kwargs.get("dim", 0)) if tp_fraction else 0,
        param_modules=sum(
            1 for m in model.modules() if next(m.parameters(False), None) is not None
        ),
        row_params=lookups.row_params,
        row_elements_per_sample=lookups.elements / num,
    )


class RowLookups:
    """Counts the row elements a traced batch looks up in `model`'s row tables."""

    def __init__(self, model: nn.Module) -> None:
        modules = sparse_modules(model)
        self.row_params = sum(m.weight.numel() for m in modules)
        self.elements = 0.0
        self.handles = [m.register_forward_pre_hook(self._count) for m in modules]

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.elements += args[0].numel() * (module.weight.shape[1] + 2)

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
