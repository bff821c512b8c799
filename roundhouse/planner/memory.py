"""Per-rank memory of each strategy: parameters, gradients, optimizer state, activations, buffers.

Model states follow the accounting of DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) for
bf16 mixed precision with Adam: 2 bytes of bf16 parameters, 4 of fp32 gradients (plus 2 of bf16
gradients below ZeRO-3), 4 of fp32 master weights and 4 per optimizer moment; ZeRO stage k
partitions the optimizer (k >= 1), gradients (k >= 2) and parameters (k = 3) over the
data-parallel ranks, and ZeRO-3 holds the largest layer gathered (parameter and gradient,
`4 x largest_layer_params` bytes). In fp32, DeepSpeed keeps a partitioned fp32 copy as its
master weights even when the model is fp32, so that copy is counted too.

roundhouse's own strategies (single, ring, ps) keep fp32 parameters under bf16 autocast, with
fp32 gradients and the torch optimizer's state; ring adds its bucket buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# DeepSpeed's default `zero_optimization.reduce_bucket_size` (elements): ZeRO-1/2 allocate one
# gradient staging buffer of this size (two with overlap_comm, the default for ZeRO-3 only).
DS_REDUCE_BUCKET = 5e8


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
    if name == "rmsprop":
        return 1 + (momentum > 0)
    if name == "adagrad":
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


def zero_states(
    num_params: float,
    largest_layer: float,
    *,
    stage: int,
    dp: int,
    moments: int,
    bf16: bool,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> tuple[float, float, float, float]:
    """(params, grads, optimizer, host) bytes per rank of DeepSpeed ZeRO `stage` over `dp` ranks.

    Matches DeepSpeed's estimators for bf16 + Adam (see the module doc): ZeRO-2 gives
    `2P + 18P/dp`, ZeRO-3 `4 L + 18P/dp`, ZeRO-2 with optimizer offload `2P` on the device.
    """
    p, n = num_params, dp
    low = 2 if bf16 else 4  # bytes of the model's own parameters
    master = 4 * moments + 4  # fp32 master copy and moments
    if stage == 3:
        params = low * p / n + (2 if bf16 else 4) * largest_layer
        grads = 4 * p / n + (2 if bf16 else 0) * largest_layer
    else:
        params = low * p
        grads = {0: low + 4 * bf16, 1: low + 4 * bf16 / n, 2: (low + 4 * bf16) / n}[stage] * p
    optimizer = master * p / (n if stage >= 1 else 1)
    host = 0.0
    if offload_optimizer:  # fp32 gradients, master weights and moments live on the host
        host = (optimizer + (4 * p / n if stage >= 2 else 0)) * 1.0
        grads = 0.0 if stage == 2 else grads - 4 * p / n
        optimizer = 0.0
    if offload_params and stage == 3:
        host += params - (2 if bf16 else 4) * largest_layer
        params = (2 if bf16 else 4) * largest_layer
    return params, grads, optimizer, host


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
