"""DeepSpeed's cost model for `roundhouse plan`: ZeRO 0-3 with offloads, and pipeline, tensor
and expert parallel where the model allows them.

Memory: ZeRO stage k partitions the optimizer (k >= 1), gradients (k >= 2) and parameters
(k = 3) over the data-parallel ranks (`zero_states`, DeepSpeed's own estimators). Compute: the
model's step on this rank's share (a pipeline: the whole model once, its fill and drain, then
its busiest stage per further micro-batch),
plus what the ZeRO engine's hooks add (calibrated on one rank: the `zero2` engine for stages
0-2, which share its bucketed gradient path, and `zero3`), and the optimizer over the states
this rank owns. Exchange: ZeRO-0/1/2 reduce each bucket to its partition's owner and gather the
parameters (`2(N-1)/N` bytes); ZeRO-3 gathers in forward and backward and reduce-scatters
(`3(N-1)/N`, three calls per module with parameters); a pipeline sends each micro-batch's
boundary activation and its gradient; tensor parallel all-reduces the layer activations 4
times per layer, expert parallel all-to-alls the routed tokens 4 times per MoE layer. Every
section is validated, so a value the row leaves out is the schema's default.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

from roundhouse.parallel.costs import (
    Candidate,
    CostModel,
    JobShape,
    Memory,
    ModelProfile,
    Target,
    activation_bytes,
    collective_s,
    optimizer_scratch,
    tensor_parallel_activation_share,
)
from roundhouse.parallel.deepspeed.partition import pipeline_step_share, stage_saved, stage_sums
from roundhouse.parallel.deepspeed.zero_memory import DS_REDUCE_BUCKET, zero_buffers, zero_states


def divisors_above_one(n: int) -> list[int]:
    """The divisors of `n` from 2 up to `n`."""
    return [d for d in range(2, n + 1) if n % d == 0]


class DeepSpeedCosts(CostModel):
    """ZeRO data parallel and DeepSpeed's model-parallel layouts."""

    def row(self, **settings: Any) -> dict[str, Any]:
        """A section of this kind with `settings`."""
        return {"kind": self.kind, **settings}

    @property
    def probes(self) -> dict[str, tuple[str, dict[str, Any]]]:  # type: ignore[override]
        """ZeRO-2 (for stages 0-2), ZeRO-3 and 2 pipeline stages (last: a pipeline leaves
        DeepSpeed's global model-parallel state set for later engines)."""
        return {
            "zero": ("zero2", self.row(zero_stage=2)),
            "zero3": ("zero3", self.row(zero_stage=3)),
            "pipeline": ("pipeline2", self.row(zero_stage=1, pipeline_stages=2)),
        }

    @property
    def engines(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        """The ZeRO engines calibrated on one rank (none where DeepSpeed is not installed)."""
        if importlib.util.find_spec("deepspeed") is None:
            return {}
        return {f"zero{k}": self.row(zero_stage=k) for k in (2, 3)}

    def sections(self, workers: int, profile: ModelProfile) -> list[tuple[str, dict[str, Any]]]:
        """ZeRO rows at any size; model-parallel rows on more than one worker."""
        rows = self.zero_sections()
        if workers > 1:
            rows += self.model_parallel_sections(workers, profile)
        return rows

    def zero_sections(self) -> list[tuple[str, dict[str, Any]]]:
        """ZeRO 0-3, and CPU offload of the optimizer (1-3) and of parameters (3)."""
        rows = [(f"zero{stage}", self.row(zero_stage=stage)) for stage in range(4)]
        for stage in (1, 2, 3):
            rows.append(
                (f"zero{stage}+offload", self.row(zero_stage=stage, offload_optimizer="cpu"))
            )
        both = self.row(zero_stage=3, offload_optimizer="cpu", offload_params="cpu")
        return [*rows, ("zero3+offload-params", both)]

    def model_parallel_sections(
        self, workers: int, profile: ModelProfile
    ) -> list[tuple[str, dict[str, Any]]]:
        """Pipeline, tensor and expert parallel sizes the model and `workers` allow."""
        rows = []
        if profile.layers and not profile.tied_across_layers and not profile.num_experts:
            for stages in divisors_above_one(workers):
                if stages <= len(profile.layers):
                    rows.append(
                        (f"pipeline{stages}", self.row(zero_stage=1, pipeline_stages=stages))
                    )
        if profile.num_heads:
            for tp in divisors_above_one(workers):
                if profile.num_heads % tp == 0:
                    rows.append((f"tp{tp}", self.row(zero_stage=1, tensor_parallel=tp)))
        if profile.num_experts:
            for ep in divisors_above_one(workers):
                if profile.num_experts % ep == 0:
                    rows.append((f"ep{ep}", self.row(zero_stage=2, expert_parallel=ep)))
        return rows

    def local_params(self, c: Candidate, p: ModelProfile) -> float:
        """Parameters one rank holds before ZeRO partitioning (its stage, tp shard, experts)."""
        if c.pipeline_stages > 1:
            return max(stage_sums([layer.num_params for layer in p.layers], c.pipeline_stages))
        if c.tensor_parallel > 1:
            f = p.tp_param_fraction
            return p.num_params * ((1 - f) + f / c.tensor_parallel)
        if c.expert_parallel > 1:
            return p.num_params - p.expert_params + p.expert_params / c.expert_parallel
        return float(p.num_params)

    def activations(self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> float:
        """A micro-batch's activations on this rank (a pipeline holds its micro-batches in
        flight on its busiest stage; tensor parallel splits part of each layer's)."""
        saved, largest = p.saved_bytes, p.largest_saved_bytes
        if c.pipeline_stages > 1:
            in_flight = min(c.pipeline_stages, shape.grad_accum_steps)
            saved, largest = stage_saved(p, c.pipeline_stages) * in_flight, 0.0
        elif c.tensor_parallel > 1:
            saved *= tensor_parallel_activation_share(c.tensor_parallel)
        return activation_bytes(saved, largest, c.micro_batch, t.autocast_bf16)

    def memory(self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> Memory:
        """ZeRO's partitioned states, its staging bucket and the activations of this rank."""
        s, n_local = c.section, self.local_params(c, p)
        offloaded = s.offload_optimizer != "none"
        params, grads, optimizer, host = zero_states(
            n_local,
            p.largest_layer_params,
            stage=s.zero_stage,
            dp=c.data_parallel,
            moments=shape.optimizer_moments,
            bf16=t.ds_bf16,
            offload_optimizer=offloaded,
            offload_params=s.offload_params != "none",
        )
        buffers = p.buffer_bytes + zero_buffers(s.zero_stage, t.ds_bf16)
        moments = shape.optimizer_moments
        scratch = 0.0 if offloaded else optimizer_scratch(n_local / c.data_parallel, moments)
        activations = self.activations(c, p, t, shape)
        return Memory(params, grads, optimizer, activations, buffers, host, scratch)

    def engine(self, c: Candidate) -> str | None:
        """The calibrated engine a row runs (None for pipeline rows)."""
        if c.pipeline_stages > 1:
            return None
        return "zero3" if c.section.zero_stage == 3 else "zero2"

    def compute_s(self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> float:
        """This rank's share of the step, the engine's hooks, the optimizer over the states
        it owns (3x offloaded: the host's Adam and the PCIe copies) and the loop's work."""
        rate, accum, micro = t.rate(), shape.grad_accum_steps, c.micro_batch
        share = self.local_params(c, p) / p.num_params
        fwd_bwd = rate.fwd_bwd(micro)
        if c.pipeline_stages > 1:
            compute = fwd_bwd * pipeline_step_share(p, c.pipeline_stages, accum)
        elif c.tensor_parallel > 1:
            compute = accum * fwd_bwd * share
        else:
            compute = accum * fwd_bwd
        engine = self.engine(c)
        compute += accum * rate.engine_fwd_bwd_s.get(engine, 0.0) * share
        owned = share / c.data_parallel if c.section.zero_stage >= 1 else share
        optimizer = rate.engine_optimizer_s.get(engine, rate.optimizer_s) * owned
        if c.section.offload_optimizer != "none":
            optimizer *= 3
        return compute + optimizer + rate.loop(micro * accum)

    def exchange_s(
        self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape
    ) -> tuple[float, float]:
        """(ZeRO's data-parallel exchange, the model-parallel traffic of pipeline, tp, ep)."""
        return self.zero_exchange_s(c, p, t), self.model_parallel_s(c, p, t, shape)

    def zero_exchange_s(self, c: Candidate, p: ModelProfile, t: Target) -> float:
        """ZeRO-3: per module, gather in forward and backward and reduce-scatter; else per
        bucket a reduce to each partition's owner, then one all-gather of parameters."""
        n, elem, local = c.data_parallel, 2 if t.ds_bf16 else 4, self.local_params(c, p)
        if c.section.zero_stage == 3:
            return collective_s(t.link, 3 * (n - 1) / n * elem * local, 3 * p.param_modules, n)
        buckets = max(1, math.ceil(local / DS_REDUCE_BUCKET))
        return collective_s(t.link, 2 * (n - 1) / n * elem * local, (n + 1) * buckets, n)

    def model_parallel_s(self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> float:
        """Pipeline boundaries, tensor-parallel all-reduces, expert-parallel all-to-alls."""
        link, accum = t.link, shape.grad_accum_steps
        per_layer = (
            c.micro_batch * p.tokens_per_sample * p.hidden_dim * (2 if t.autocast_bf16 else 4)
        )
        calls = 4 * max(1, len(p.layers) - 2) * accum
        if c.pipeline_stages > 1:
            boundary = max(layer.output_bytes for layer in p.layers[:-1]) * c.micro_batch
            return accum * 2 * (link.latency_s + boundary / link.bytes_per_s)
        if c.tensor_parallel > 1:
            tp = c.tensor_parallel
            return collective_s(link, calls * 2 * (tp - 1) / tp * per_layer, calls, tp)
        if c.expert_parallel > 1:
            ep = c.expert_parallel
            return collective_s(link, calls * (ep - 1) / ep * per_layer, calls, ep)
        return 0.0

    def family(self, c: Candidate) -> str | None:
        """`pipeline`, `zero3` or `zero` (tensor and expert parallel rows are not probed)."""
        if c.tensor_parallel > 1 or c.expert_parallel > 1:
            return None
        if c.pipeline_stages > 1:
            return "pipeline"
        return "zero3" if c.section.zero_stage == 3 else "zero"

    def residual_s(
        self, family: str, c: Candidate, p: ModelProfile, shape: JobShape, fitted: dict
    ) -> float:
        """ZeRO: once per ring step; a pipeline: per boundary and per slot of its schedule
        (2 at the probe)."""
        per_step = self.probed_step_s(family, c, p, shape, fitted)
        if family == "pipeline":
            s = c.pipeline_stages
            return per_step * (s - 1) * (shape.grad_accum_steps + s - 1) / 2
        return per_step * (c.data_parallel - 1)
