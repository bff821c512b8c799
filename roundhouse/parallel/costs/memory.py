"""Per-rank memory: the breakdown, and the formulas every strategy's cost model shares.

ZeRO's partitioned states are DeepSpeed's own (`parallel/deepspeed/costs.py`).

roundhouse's own strategies (single, ring, ps) keep fp32 parameters under bf16 autocast, with
fp32 gradients and the torch optimizer's state; ring adds its bucket buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Memory:
    """Bytes per rank on the device (and on the host for offloaded state)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float
    host: float = 0.0
    scratch: float = 0.0
    grads_freed: bool = False

    @property
    def total(self) -> float:
        """The peak: states and buffers, plus the larger of the backward pass's activations
        and the optimizer step's temporaries (they are never alive together). Gradients freed
        after each step (`zero_grad(set_to_none=True)`) do not exist yet when the backward pass
        starts with every activation saved, so they count with the optimizer step instead: from
        then on each layer's gradients take the place of its freed activations."""
        if self.grads_freed:
            states = self.params + self.optimizer + self.buffers
            return states + max(self.activations, self.grads + self.scratch)
        states = self.params + self.grads + self.optimizer + self.buffers
        return states + max(self.activations, self.scratch)

    def as_dict(self) -> dict[str, float]:
        """The breakdown in bytes by part, for `--json`."""
        fields = {k: v for k, v in asdict(self).items() if k != "grads_freed"}
        return {**fields, "total": self.total}


def optimizer_moments(name: str, momentum: float) -> int:
    """fp32 tensors the torch optimizer keeps per parameter (Adam's two moments, ...)."""
    if name in ("adam", "adamw"):
        return 2
    if name in ("rmsprop", "adagrad"):  # square averages / sums (RMSprop is built without momentum)
        return 1
    return 1 if momentum > 0 else 0


def optimizer_scratch(updated_tensor_params: float, moments: int) -> float:
    """Temporaries of one optimizer step over tensors of `updated_tensor_params` elements at a
    time: Adam's `sqrt(v) + eps` denominator (torch's foreach kernels on a GPU take all
    parameters at once, its CPU kernels one tensor at a time; DeepSpeed one flat partition)."""
    return 4 * updated_tensor_params if moments >= 2 else 0.0


def plain_states(num_params: float, moments: int) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes of an fp32 model with a torch optimizer."""
    return 4 * num_params, 4 * num_params, 4 * moments * num_params


def activation_bytes(
    saved_per_sample: float, largest_per_sample: float, micro: float, bf16: bool
) -> float:
    """Activations at the peak of a micro-batch: everything saved for backward plus the
    gradient of the largest saved tensor (the backward pass's scratch at its start).

    bf16 autocast saves matmul inputs in bf16: roughly half the fp32 trace.
    """
    scale = 0.5 if bf16 else 1.0
    return (saved_per_sample + largest_per_sample) * micro * scale


def tensor_parallel_activation_share(tp: int) -> float:
    """Share of a transformer layer's activations one of `tp` ranks keeps (Megatron: of the
    34 bytes per token and width, 10 stay replicated and 24 split; Korthikanti et al. 2022)."""
    return (10 + 24 / tp) / 34
