"""What the planner knows about a model: figures per sample from one meta-device trace.

`roundhouse.calibration.trace.profile_model` fills it in; cost models read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerProfile:
    """One entry of the model's `pipeline_layers`, per sample where it scales with the batch."""

    num_params: int
    saved_bytes: float
    output_bytes: float
    fwd_flops: float = 0.0


@dataclass(frozen=True)
class ModelProfile:
    """What the planner knows about a model, from its trace.

    Attributes:
        num_params: Distinct parameters (tied weights counted once).
        largest_layer_params: Parameters of the largest module (own parameters only), the
            unit ZeRO-3 gathers at once (DeepSpeed's `largest_layer_params`).
        buffer_bytes: Bytes of registered buffers (replicated on every rank).
        fwd_flops: Forward FLOPs per sample.
        saved_bytes: Bytes autograd saves for backward per sample, fp32.
        largest_saved_bytes: The largest single saved tensor per sample: the scratch the
            backward pass holds on top (its gradient) at the peak.
        tp_param_fraction: Share of parameters tensor parallel splits (attention and MLP maps).
        expert_params: Parameters inside MoE experts (split by expert parallel).
        num_experts: Experts per MoE layer (0: not an MoE model).
        layers: Per pipeline layer figures; empty when the model has no `pipeline_layers`.
        tied_across_layers: Whether pipeline layers share a weight (gpt's tied embedding).
        num_heads: Attention heads (tensor parallel must divide them); 0 when not a transformer.
        tokens_per_sample: Sequence length for token models, else 1.
        hidden_dim: Width C of a transformer (the activations TP and EP exchange), else 0.
        param_modules: Modules owning parameters (ZeRO-3 gathers each one separately).
        row_params: Parameters in row tables (sparse-gradient embeddings, `models.sparse`).
        row_elements_per_sample: Elements of the rows one sample looks up in them (row ids
            counted as two elements): what `ps` pushes and pulls of a table, per sample.
    """

    num_params: int
    largest_layer_params: int
    buffer_bytes: float
    fwd_flops: float
    saved_bytes: float
    largest_saved_bytes: float
    tp_param_fraction: float = 0.0
    expert_params: int = 0
    num_experts: int = 0
    layers: list[LayerProfile] = field(default_factory=list)
    tied_across_layers: bool = False
    num_heads: int = 0
    tokens_per_sample: int = 1
    hidden_dim: int = 0
    param_modules: int = 1
    row_params: int = 0
    row_elements_per_sample: float = 0.0

    @property
    def step_flops(self) -> float:
        """Forward + backward FLOPs per sample."""
        return 3 * self.fwd_flops
