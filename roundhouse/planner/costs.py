"""Memory and step time of one candidate: the formulas of `roundhouse plan`.

Step time = compute + exposed communication. Compute is the calibrated (or FLOP-derived)
forward + backward time of this rank's share of the model at the micro-batch, times the
accumulation steps (a pipeline runs its busiest stage's FLOP share and adds its fill-and-drain
bubble), plus what a ZeRO engine's hooks add to each pass, the optimizer step over the state
this rank owns (DeepSpeed's own optimizer step for ZeRO rows) and the loop's own per-step work
(next batch, finite-loss check), all calibrated on this machine through roundhouse's loop
(`loopcal.py`); a table accelerator has none of these extras. Communication is each strategy's
own exchange per optimizer step, per rank, over the link's `latency + bytes / bandwidth`:

| strategy | bytes per rank and step |
|---|---|
| ring, ZeRO-0/1/2 | `2(N-1)/N x gradient bytes` (all-reduce, or reduce-scatter + all-gather) |
| ZeRO-3 | `3(N-1)/N x parameter bytes` (gather in forward and backward, reduce-scatter), in
  three collective calls per module that owns parameters |
| ps (sync) | push gradients + pull parameters; the server's link carries all N workers |
| pipeline | each micro-batch's boundary activation forward and its gradient back |
| tensor parallel | 4 all-reduces of the layer's activations per layer and micro-batch |
| expert parallel | 4 all-to-alls of the routed tokens per MoE layer and micro-batch |
| every N > 1 | the loop's finite-loss check: one scalar all-reduce per step |

On this machine's CPU a row also pays its family's residual: what the strategy's exchange path
cost per step beyond this model at 2 ranks (`exchangecal.py`: probed on the job itself when
that is cheap, else fitted per module and parameter on small probe jobs), times `N - 1` (ps:
`N / 2`, its pushers; a pipeline: per stage boundary and per micro-batch of its schedule).

On a GPU, gradient exchange overlaps the backward pass (bucketed hooks, ZeRO's overlap_comm):
only what does not fit under the backward (2/3 of compute) is exposed. On a CPU the same cores
compute and communicate, so all of it is exposed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from roundhouse.planner.calibrate import LinkRate, StepRate
from roundhouse.planner.candidates import Candidate
from roundhouse.planner.memory import (
    DS_REDUCE_BUCKET,
    Memory,
    activation_bytes,
    optimizer_scratch,
    plain_states,
    tensor_parallel_activation_share,
    zero_states,
)
from roundhouse.planner.trace import ModelProfile

BACKWARD_SHARE = 2 / 3  # of a step's compute, the window gradient exchange can hide under
WORKERS_PROBED = 2  # ranks of `exchangecal`'s probes: a residual is per step at this size


@dataclass(frozen=True)
class Target:
    """The hardware a plan is for.

    Attributes:
        device: Name shown in the plan.
        memory_bytes: Memory of one worker's device.
        rate: Compute model: `rate(micro_batch)` -> StepRate for the whole model.
        link: The collectives' link.
        autocast_bf16: bf16 autocast on (activations in bf16, bf16 FLOP rate).
        ds_bf16: DeepSpeed in bf16 mixed precision (bf16 parameters, fp32 master weights).
        overlap: Whether gradient exchange overlaps the backward pass (GPUs).
        residuals: Per exchange family, `<family>/fixed` and `<family>/per_module`: seconds per
            step its path costs at 2 ranks beyond the link model (`exchangecal.py`; empty
            where not measured).
    """

    device: str
    memory_bytes: float
    rate: Callable[[], StepRate]
    link: LinkRate
    autocast_bf16: bool = False
    ds_bf16: bool = False
    overlap: bool = False
    residuals: Callable[[], dict[str, float]] = dict


@dataclass(frozen=True)
class JobShape:
    """The job values every candidate shares."""

    global_batch: int
    grad_accum_steps: int
    optimizer_moments: int
    ring_bucket_mb: float = 25.0
    ps_servers: int = 1


@dataclass
class Row:
    """One candidate's prediction."""

    candidate: Candidate
    micro_batch: float
    memory: Memory
    compute_s: float
    comm_s: float
    fits: bool
    notes: list[str] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        """Seconds per optimizer step: compute plus exposed communication."""
        return self.compute_s + self.comm_s

    def samples_per_s(self, global_batch: int) -> float:
        """Training throughput at `global_batch` samples per step."""
        return global_batch / self.step_s if self.step_s > 0 else math.inf


def collective_s(link: LinkRate, volume: float, calls: float, ranks: int) -> float:
    """Time of `calls` collectives moving `volume` bytes per rank among `ranks` ranks."""
    if ranks <= 1:
        return 0.0
    return calls * link.latency_s * (ranks - 1) + volume / link.bytes_per_s


def local_params(c: Candidate, p: ModelProfile) -> float:
    """Parameters one rank holds before ZeRO partitioning (its stage, tp shard, experts)."""
    if c.pipeline_stages > 1:
        return max(stage_sums([layer.num_params for layer in p.layers], c.pipeline_stages))
    if c.tensor_parallel > 1:
        f = p.tp_param_fraction
        return p.num_params * ((1 - f) + f / c.tensor_parallel)
    if c.expert_parallel > 1:
        return p.num_params - p.expert_params + p.expert_params / c.expert_parallel
    return float(p.num_params)


def stage_groups(values: list[float], stages: int) -> list[list[int]]:
    """Indices of `values` split into `stages` contiguous parts of about equal sum (greedy)."""
    target = sum(values) / stages
    groups: list[list[int]] = [[]]
    current = 0.0
    for i, v in enumerate(values):
        left = len(values) - i
        if (
            current
            and current + v / 2 > target
            and len(groups) < stages
            and left >= stages - len(groups)
        ):
            groups.append([])
            current = 0.0
        groups[-1].append(i)
        current += v
    return groups + [[] for _ in range(stages - len(groups))]


def stage_sums(values: list[float], stages: int) -> list[float]:
    """Sums of `values` split into `stages` contiguous parts of about equal sum (greedy)."""
    return [sum(values[i] for i in group) for group in stage_groups(values, stages)]


def busiest_stage_share(p: ModelProfile, stages: int) -> float:
    """Share of the model's FLOPs on its busiest pipeline stage, the layers split by
    parameters as DeepSpeed's default `partition_method: parameters` splits them."""
    flops = [layer.fwd_flops for layer in p.layers]
    if not sum(flops):
        return 1 / stages
    groups = stage_groups([layer.num_params for layer in p.layers], stages)
    return max(sum(flops[i] for i in group) for group in groups) / sum(flops)


def stage_saved(p: ModelProfile, stages: int) -> float:
    """Saved bytes per sample of the busiest pipeline stage (split by parameters, as DeepSpeed's
    default `partition_method: parameters`)."""
    return max(stage_sums([layer.saved_bytes for layer in p.layers], stages))


def estimate_memory(
    c: Candidate, p: ModelProfile, t: Target, job: JobShape, micro: float
) -> Memory:
    """Per-rank memory of candidate `c` at micro-batch `micro`."""
    n_local = local_params(c, p)
    kind = c.strategy["kind"]
    saved, largest = p.saved_bytes, p.largest_saved_bytes
    if c.pipeline_stages > 1:
        in_flight = min(c.pipeline_stages, job.grad_accum_steps)
        saved, largest = stage_saved(p, c.pipeline_stages) * in_flight, 0.0
    elif c.tensor_parallel > 1:
        saved *= tensor_parallel_activation_share(c.tensor_parallel)
    activations = activation_bytes(saved, largest, micro, t.autocast_bf16)
    if "zero_stage" not in c.strategy:  # no ZeRO: every rank holds whole states
        params, grads, optimizer = plain_states(n_local, job.optimizer_moments)
        buffers = p.buffer_bytes + EXCHANGE_BUFFERS.get(kind, no_buffers)(job, n_local)
        at_once = n_local if t.overlap else p.largest_layer_params  # foreach on GPUs only
        scratch = optimizer_scratch(at_once, job.optimizer_moments)
        freed = kind in GRADS_FREED
        return Memory(params, grads, optimizer, activations, buffers, 0.0, scratch, freed)
    s = c.strategy
    params, grads, optimizer, host = zero_states(
        n_local,
        p.largest_layer_params,
        stage=s["zero_stage"],
        dp=c.data_parallel,
        moments=job.optimizer_moments,
        bf16=t.ds_bf16,
        offload_optimizer=s.get("offload_optimizer", "none") != "none",
        offload_params=s.get("offload_params", "none") != "none",
    )
    buffers = p.buffer_bytes + zero_buffers(s["zero_stage"], n_local, t.ds_bf16)
    offloaded = s.get("offload_optimizer", "none") != "none"
    scratch = (
        0.0 if offloaded else optimizer_scratch(n_local / c.data_parallel, job.optimizer_moments)
    )
    return Memory(params, grads, optimizer, activations, buffers, host, scratch)


def zero_buffers(stage: int, n_local: float, bf16: bool) -> float:
    """DeepSpeed's gradient staging bucket (ZeRO-1/2 allocate `reduce_bucket_size` elements)."""
    if stage in (1, 2):
        return DS_REDUCE_BUCKET * (2 if bf16 else 4)
    return 0.0


def compute_time(c: Candidate, p: ModelProfile, t: Target, job: JobShape, micro: float) -> float:
    """Forward + backward of this rank's share over the accumulation steps (a pipeline's busiest
    stage, with its fill-and-drain bubble), the ZeRO engine's own hooks, the optimizer step over
    the state this rank owns, and the loop's own per-step work."""
    rate = t.rate()
    share = local_params(c, p) / p.num_params
    fwd_bwd = rate.fwd_bwd(micro)
    if c.pipeline_stages > 1:
        s = c.pipeline_stages
        per_micro = fwd_bwd * busiest_stage_share(p, s)
        compute = per_micro * (job.grad_accum_steps + s - 1)
    elif c.tensor_parallel > 1:
        compute = job.grad_accum_steps * fwd_bwd * share
    else:
        compute = job.grad_accum_steps * fwd_bwd
    engine = zero_engine(c)
    compute += job.grad_accum_steps * rate.zero_fwd_bwd_s.get(engine, 0.0) * share
    owned = share
    if c.strategy.get("zero_stage", 0) >= 1:
        owned = share / c.data_parallel
    optimizer = rate.zero_optimizer_s.get(engine, rate.optimizer_s) * owned
    if c.strategy.get("offload_optimizer", "none") != "none":
        optimizer *= 3  # the host's Adam, plus gradients down and parameters up over PCIe
    return compute + optimizer + rate.loop(micro * job.grad_accum_steps)


def zero_engine(c: Candidate) -> int | None:
    """The calibrated ZeRO engine a DeepSpeed row runs (stages 0-2 share the bucketed gradient
    path of stage 2, 3 has its own); None for pipeline rows and roundhouse's own strategies."""
    if c.strategy["kind"] != "deepspeed" or c.pipeline_stages > 1:
        return None
    return 3 if c.strategy.get("zero_stage", 0) == 3 else 2


def comm_time(
    c: Candidate, p: ModelProfile, t: Target, job: JobShape, micro: float
) -> tuple[float, float]:
    """Seconds per step of this candidate's exchange before overlap: (gradient exchange, which
    a GPU hides under the backward pass; model-parallel traffic on the critical path)."""
    return EXCHANGE_TIME[c.strategy["kind"]](c, p, t, job, micro)


def single_comm(
    c: Candidate, p: ModelProfile, t: Target, job: JobShape, micro: float
) -> tuple[float, float]:
    """One device exchanges nothing."""
    return 0.0, 0.0


def ring_comm(
    c: Candidate, p: ModelProfile, t: Target, job: JobShape, micro: float
) -> tuple[float, float]:
    """The ring all-reduce moves 2(N-1)/N of the gradient bytes, in buckets it can overlap."""
    n, grad_bytes = c.data_parallel, 4 * local_params(c, p)
    buckets = math.ceil(grad_bytes / (job.ring_bucket_mb * 2**20))
    return collective_s(t.link, 2 * (n - 1) / n * grad_bytes, 2 * buckets, n), 0.0


def ps_exchanged(c: Candidate, p: ModelProfile, micro: float) -> float:
    """Elements a ps worker pushes (and pulls) per step: the dense parameters, and of the row
    tables only the rows its micro-batches look up (at most the whole tables)."""
    rows = min(micro * p.row_elements_per_sample, p.row_params)
    return local_params(c, p) - p.row_params + rows


def ps_comm(
    c: Candidate, p: ModelProfile, t: Target, job: JobShape, micro: float
) -> tuple[float, float]:
    """Every worker pushes and pulls through the servers; a sync pull waits for every push."""
    n, grad_bytes = c.data_parallel, 4 * ps_exchanged(c, p, micro)
    server_bytes = n * 2 * grad_bytes / job.ps_servers
    return 0.0, 2 * t.link.latency_s + server_bytes / t.link.bytes_per_s


def deepspeed_comm(
    c: Candidate, p: ModelProfile, t: Target, job: JobShape, micro: float
) -> tuple[float, float]:
    """(ZeRO's data-parallel exchange, the model-parallel traffic of pipeline, tp and ep)."""
    link, n, s = t.link, c.data_parallel, c.strategy
    elem = 2 if t.ds_bf16 else 4
    local = local_params(c, p)
    buckets = max(1, math.ceil(local / DS_REDUCE_BUCKET))
    if s.get("zero_stage", 0) == 3:  # per module: gather in forward and backward, reduce
        calls = 3 * p.param_modules
        dp = collective_s(link, 3 * (n - 1) / n * elem * local, calls, n)
    else:  # per bucket: a reduce to each partition's owner, then one all-gather of parameters
        dp = collective_s(link, 2 * (n - 1) / n * elem * local, (n + 1) * buckets, n)
    act_elem = 2 if t.autocast_bf16 else 4
    tokens = micro * p.tokens_per_sample
    mp = 0.0
    if c.pipeline_stages > 1:
        boundary = max(layer.output_bytes for layer in p.layers[:-1]) * micro
        mp = job.grad_accum_steps * 2 * (link.latency_s + boundary / link.bytes_per_s)
    elif c.tensor_parallel > 1:
        tp = c.tensor_parallel
        per_layer = tokens * p.hidden_dim * act_elem
        calls = 4 * max(1, len(p.layers) - 2) * job.grad_accum_steps
        mp = collective_s(link, calls * 2 * (tp - 1) / tp * per_layer, calls, tp)
    elif c.expert_parallel > 1:
        ep = c.expert_parallel
        per_layer = tokens * p.hidden_dim * act_elem
        calls = 4 * max(1, len(p.layers) - 2) * job.grad_accum_steps
        mp = collective_s(link, calls * (ep - 1) / ep * per_layer, calls, ep)
    return dp, mp


def evaluate(c: Candidate, p: ModelProfile, t: Target, job: JobShape) -> Row:
    """The full prediction for candidate `c`."""
    micro = job.global_batch / (c.data_parallel * job.grad_accum_steps)
    memory = estimate_memory(c, p, t, job, micro)
    compute = compute_time(c, p, t, job, micro)
    hideable, critical = comm_time(c, p, t, job, micro)
    if t.overlap:
        hideable = max(hideable - BACKWARD_SHARE * compute, 0.0)
    check = collective_s(t.link, 0.0, 1, c.workers)  # the loop's finite-loss check (a scalar)
    comm = hideable + critical + check + residual_s(c, p, t, job)
    return Row(c, micro, memory, compute, comm, fits=memory.total <= t.memory_bytes)


def exchange_family(c: Candidate) -> str | None:
    """The `exchangecal` family whose residual row `c` pays (None: not probed)."""
    s = c.strategy
    if s["kind"] in ("ring", "ps"):
        return s["kind"]
    if s["kind"] != "deepspeed" or c.tensor_parallel > 1 or c.expert_parallel > 1:
        return None
    if c.pipeline_stages > 1:
        return "pipeline"
    return "zero3" if s.get("zero_stage", 0) == 3 else "zero"


def residual_s(c: Candidate, p: ModelProfile, t: Target, job: JobShape) -> float:
    """Row `c`'s share of its family's probed residual, seconds per step at 2 ranks and one
    micro-batch (`exchangecal.py`): the job's own `<family>/step` where it was probed, else
    `fixed + per_module x modules` (ps: `+ per_param x parameters / servers`), scaled to the
    row."""
    family = exchange_family(c)
    if c.workers <= 1 or family is None:
        return 0.0
    fitted = t.residuals()
    if f"{family}/step" in fitted:  # the job's own step, probed at 2 ranks
        # Below 0 the plan over-priced the probe's step: noise or the base model, not an
        # exchange cost that grows with the ranks.
        per_step = max(fitted[f"{family}/step"], 0.0)
    else:  # the probe MLPs' fit
        modules = p.param_modules / c.pipeline_stages
        per_step = fitted.get(f"{family}/fixed", 0.0)
        per_step += fitted.get(f"{family}/per_module", 0.0) * modules
        if family == "ps":  # bytes and updates: each server shard its part, in parallel
            micro = job.global_batch / (c.data_parallel * job.grad_accum_steps)
            exchanged = ps_exchanged(c, p, micro)
            per_step += fitted.get("ps/per_param", 0.0) * exchanged / job.ps_servers
    if family == "pipeline":  # per boundary and per slot of the schedule (2 at the probe)
        s = c.pipeline_stages
        return per_step * (s - 1) * (job.grad_accum_steps + s - 1) / 2
    if family == "ps":  # the server serves the N pushers one after another
        return per_step * c.data_parallel / WORKERS_PROBED
    return per_step * (c.data_parallel - 1)


def no_buffers(job: JobShape, n_local: float) -> float:
    """A strategy without exchange buffers of its own."""
    return 0.0


# Per strategy kind: what its exchange costs (a new strategy adds one entry to each table).
EXCHANGE_TIME = {
    "single": single_comm,
    "ring": ring_comm,
    "ps": ps_comm,
    "deepspeed": deepspeed_comm,
}
# Strategies whose optimizer step ends with `zero_grad(set_to_none=True)` (ring's buckets are
# separate buffers); the parameter server's pulled copies and DeepSpeed's partitions persist.
GRADS_FREED = ("single", "ring")
EXCHANGE_BUFFERS = {
    "ring": lambda job, n_local: 2 * job.ring_bucket_mb * 2**20,  # a bucket in flight, one filling
    "ps": lambda job, n_local: 4 * n_local,  # the pulled parameters' staging copy
}
