"""Per-rank model states of DeepSpeed ZeRO: DeepSpeed's own estimators, as arithmetic.

Model states follow the accounting of DeepSpeed's estimators
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`) for bf16
mixed precision with Adam: 2 bytes of bf16 parameters, 4 of fp32 gradients (plus 2 of bf16
gradients below ZeRO-3), 4 of fp32 master weights and 4 per optimizer moment; ZeRO stage k
partitions the optimizer (k >= 1), gradients (k >= 2) and parameters (k = 3) over the
data-parallel ranks, and ZeRO-3 holds the largest layer gathered (parameter and gradient,
`4 x largest_layer_params` bytes). In fp32, DeepSpeed keeps a partitioned fp32 copy as its
master weights even when the model is fp32, so that copy is counted too.
"""

from __future__ import annotations

# DeepSpeed's default `zero_optimization.reduce_bucket_size` (elements): ZeRO-1/2 allocate one
# gradient staging buffer of this size (two with overlap_comm, the default for ZeRO-3 only).
DS_REDUCE_BUCKET = 5e8


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


def zero_buffers(stage: int, bf16: bool) -> float:
    """DeepSpeed's gradient staging bucket (ZeRO-1/2 allocate `reduce_bucket_size` elements)."""
    if stage in (1, 2):
        return DS_REDUCE_BUCKET * (2 if bf16 else 4)
    return 0.0
