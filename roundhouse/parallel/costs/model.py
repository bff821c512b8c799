"""`CostModel`: what a strategy tells the planner, and the values it is asked with.

Step time = compute + exposed communication. A cost model answers, for one `Candidate` (a
`strategy` section at a worker count, with its `Topology`): per-rank memory, compute seconds
per optimizer step, and its exchange seconds per step split into what a GPU can hide under
the backward pass and what stays on the critical path. The defaults describe a plain
data-parallel strategy (whole fp32 states on every rank, a torch optimizer, no exchange);
a strategy overrides what differs.

Calibration (`roundhouse.calibration`) asks a cost model for its probe recipe: `probes`, the
families of its exchange path measured on 2 spawned ranks (each a row label and a section);
`wide_probes`, the families whose bytes travel through their own transport and so are also
probed on a wide model; `engines`, sections whose one-rank engine costs the loop calibration
measures. A family's residual (`measured - predicted` at 2 ranks) is added to a row by
`residual_s`, scaled to the row's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from roundhouse.config.strategy_section import StrategySection, section_class_of
from roundhouse.config.topology import Topology
from roundhouse.parallel.costs.memory import (
    Memory,
    activation_bytes,
    optimizer_scratch,
    plain_states,
)
from roundhouse.parallel.costs.profile import ModelProfile

BACKWARD_SHARE = 2 / 3  # of a step's compute, the window gradient exchange can hide under
WORKERS_PROBED = 2  # ranks of the exchange probes: a residual is per step at this size


@dataclass(frozen=True)
class StepRate:
    """`fwd_bwd(B) = overhead_s + per_sample_s * B`; `optimizer_s` per optimizer step.

    Attributes:
        overhead_s: Fixed seconds of one forward + backward pass.
        per_sample_s: Seconds per sample of one forward + backward pass.
        optimizer_s: One optimizer step over the whole model (with the gradient norm).
        loop_s: The loop's own fixed work per step (the next batch, the finite-loss check).
        engine_fwd_bwd_s: By engine (a cost model's `engines`, e.g. `zero3`): seconds the
            engine adds to each forward + backward pass of the whole model (its hooks).
        engine_optimizer_s: By engine: its optimizer step over the whole model on one rank.
        loop_per_sample_s: The loop's work per sample of a step (loading and augmenting it).
    """

    overhead_s: float
    per_sample_s: float
    optimizer_s: float
    loop_s: float = 0.0
    engine_fwd_bwd_s: dict[str, float] = field(default_factory=dict)
    engine_optimizer_s: dict[str, float] = field(default_factory=dict)
    loop_per_sample_s: float = 0.0

    def fwd_bwd(self, micro_batch: float) -> float:
        """Seconds of one forward + backward of `micro_batch` samples: fixed + per-sample cost."""
        return self.overhead_s + self.per_sample_s * micro_batch

    def loop(self, samples: float) -> float:
        """Seconds of the loop's own work for a step of `samples` samples on one rank."""
        return self.loop_s + self.loop_per_sample_s * samples

    @classmethod
    def from_loop(cls, figures: dict[str, float], sizes: tuple[int, int]) -> StepRate:
        """The rate from the loop calibration's figures at micro-batches `sizes` (small,
        large): `small/*` and `large/*` of the reference strategy, `<engine>/*` of each engine
        (measured at the small size)."""
        small, large = sizes
        t_small, t_large = figures["small/fwd_bwd_s"], figures["large/fwd_bwd_s"]
        if large > small:
            per_sample = max(t_large - t_small, 0.0) / (large - small)
        else:
            per_sample = t_large / large
        engines = {k.split("/")[0] for k in figures} - {"small", "large"}
        loop_small, loop_large = figures["small/loop_s"], figures["large/loop_s"]
        # Loading (and augmenting) grows with the samples; without two sizes it is all fixed.
        loop_per_sample = (
            max(loop_large - loop_small, 0.0) / (large - small) if large > small else 0.0
        )
        return cls(
            overhead_s=max(t_small - per_sample * small, 0.0),
            per_sample_s=per_sample,
            optimizer_s=(figures["small/optimizer_s"] + figures["large/optimizer_s"]) / 2,
            loop_s=max(loop_small - loop_per_sample * small, 0.0),
            loop_per_sample_s=loop_per_sample,
            engine_fwd_bwd_s={e: max(figures[f"{e}/fwd_bwd_s"] - t_small, 0.0) for e in engines},
            engine_optimizer_s={e: figures[f"{e}/optimizer_s"] for e in engines},
        )


@dataclass(frozen=True)
class LinkRate:
    """`time(bytes) = latency_s + bytes / bytes_per_s` for one collective call."""

    latency_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class Target:
    """The hardware a plan is for.

    Attributes:
        device: Name shown in the plan.
        memory_bytes: Memory of one worker's device.
        rate: Compute model: `rate()` -> StepRate for the whole model.
        link: The collectives' link.
        autocast_bf16: bf16 autocast on (activations in bf16, bf16 FLOP rate).
        ds_bf16: An engine in bf16 mixed precision (bf16 parameters, fp32 master weights).
        overlap: Whether gradient exchange overlaps the backward pass (GPUs).
        residuals: Per exchange family, `<family>/fixed`, `<family>/per_module` (and
            `<family>/step` where the job itself was probed): seconds per step its path costs
            at 2 ranks beyond the link model (empty where not measured).
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
    """The job values every candidate shares.

    Attributes:
        global_batch: `data.batch_size`.
        grad_accum_steps: `trainer.grad_accum_steps`.
        optimizer_moments: fp32 tensors the optimizer keeps per parameter.
        remainder: `data.remainder_policy`.
        settings: The job's own `strategy` section as a dict: a cost model reads the settings
            it shares with the job (its bucket size, its server count) from here, falling back
            to its section's defaults.
        live_recovery: `cluster.recovery: live` (a strategy may keep more for it: the ring's
            copy of each step's own gradients).
    """

    global_batch: int
    grad_accum_steps: int
    optimizer_moments: int
    remainder: str = "drop"
    settings: dict[str, Any] = field(default_factory=dict)
    live_recovery: bool = False

    def topology(self, section: Any, workers: int) -> Topology:
        """The batch layout of `section` on `workers` workers at this job's batch."""
        return Topology.of_section(
            section,
            workers,
            global_batch=self.global_batch,
            grad_accum_steps=self.grad_accum_steps,
            remainder=self.remainder,
        )


@dataclass(frozen=True)
class Candidate:
    """One way to run the job: a `strategy` section on `topology.world_size` workers.

    Attributes:
        label: The plan's name for the row (`ring`, `zero3+offload`, `tp4`).
        topology: The batch and rank layout of this section at this worker count.
        strategy: The section as a job file holds it (what `kind: auto` hands over).
        section: The same, validated (defaults filled in from the schema).
        costs: The cost model that prices it.
    """

    label: str
    topology: Topology
    strategy: dict[str, Any]
    section: StrategySection = field(compare=False, repr=False)
    costs: CostModel = field(compare=False, repr=False)

    @property
    def workers(self) -> int:
        """Worker processes of this row."""
        return self.topology.world_size

    @property
    def pipeline_stages(self) -> int:
        """Pipeline stages (1 without pipeline parallel)."""
        return self.topology.pipeline_stages

    @property
    def tensor_parallel(self) -> int:
        """Tensor-parallel degree (1 without tensor parallel)."""
        return self.topology.tensor_parallel

    @property
    def expert_parallel(self) -> int:
        """Expert-parallel degree (1 without expert parallel)."""
        return self.topology.expert_parallel

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: the workers over pipeline x tensor parallel."""
        return self.topology.data_parallel

    @property
    def micro_batch(self) -> float:
        """Samples per micro-batch (a fraction where the batch does not divide evenly)."""
        return self.topology.micro_batch_exact

    @property
    def batch_splits(self) -> bool:
        """Whether every micro-batch of a step gets at least one sample."""
        return self.topology.global_batch >= self.topology.num_chunks


def collective_s(link: LinkRate, volume: float, calls: float, ranks: int) -> float:
    """Time of `calls` collectives moving `volume` bytes per rank among `ranks` ranks."""
    if ranks <= 1:
        return 0.0
    return calls * link.latency_s * (ranks - 1) + volume / link.bytes_per_s


class CostModel:
    """How the planner prices one strategy (the defaults: plain data parallel, no exchange).

    Attributes:
        solo_rows: Whether its rows on one worker are listed next to the one-device
            strategy's (False: only where that strategy is not among the allowed kinds).
        grads_freed: Its optimizer step frees the gradients (`zero_grad(set_to_none=True)`).
        probes: Exchange families measured on 2 ranks: family -> (row label, section).
        wide_probes: Families also probed on a wide model (bytes through their own transport).
        engines: Engines whose one-rank costs the loop calibration measures: name -> section.
        job_settings: Settings of the job's own section its probes take (bucket, servers).
    """

    solo_rows: ClassVar[bool] = True
    grads_freed: ClassVar[bool] = False
    probes: ClassVar[dict[str, tuple[str, dict[str, Any]]]] = {}
    wide_probes: ClassVar[tuple[str, ...]] = ()
    engines: ClassVar[dict[str, dict[str, Any]]] = {}
    job_settings: ClassVar[tuple[str, ...]] = ()

    def __init__(self, kind: str) -> None:
        """Price the strategy registered as `kind` (a subclass of a strategy inherits its cost
        model and is priced under its own kind)."""
        self.kind = kind

    def sections(self, workers: int, profile: ModelProfile) -> list[tuple[str, dict[str, Any]]]:
        """The (label, section) rows this strategy offers for `workers` workers."""
        return []

    def candidates(self, workers: int, profile: ModelProfile, shape: JobShape) -> list[Candidate]:
        """This strategy's candidates for `workers` workers at the job's batch."""
        rows = self.sections(workers, profile)
        return [self.candidate(label, workers, s, shape) for label, s in rows]

    def candidate(
        self, label: str, workers: int, strategy: dict[str, Any], shape: JobShape
    ) -> Candidate:
        """One candidate: `strategy` validated as its section, laid out on `workers` workers."""
        section = section_class_of(strategy).model_validate(strategy)
        return Candidate(label, shape.topology(section, workers), strategy, section, self)

    def setting(self, name: str, shape: JobShape, section_class: type[StrategySection]) -> Any:
        """The job's own value of `name` where its section has one, else the schema default."""
        if name in shape.settings:
            return shape.settings[name]
        return section_class.model_fields[name].default

    def probe_sections(self, shape: JobShape) -> dict[str, dict[str, Any]]:
        """Each probe family's section, with the job's own `job_settings` where it sets them."""
        out = {}
        for family, (_, section) in self.probes.items():
            cls = section_class_of(section)
            own = {name: self.setting(name, shape, cls) for name in self.job_settings}
            out[family] = {**section, **own}
        return out

    def local_params(self, c: Candidate, p: ModelProfile) -> float:
        """Parameters one rank holds (before any partitioning of its states)."""
        return float(p.num_params)

    def buffers(self, c: Candidate, shape: JobShape, n_local: float) -> float:
        """Bytes of the strategy's own exchange buffers on one rank."""
        return 0.0

    def memory(self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> Memory:
        """Per-rank memory: whole fp32 states and the torch optimizer's, plus its buffers."""
        n_local = self.local_params(c, p)
        activations = activation_bytes(
            p.saved_bytes, p.largest_saved_bytes, c.micro_batch, t.autocast_bf16
        )
        params, grads, optimizer = plain_states(n_local, shape.optimizer_moments)
        buffers = p.buffer_bytes + self.buffers(c, shape, n_local)
        at_once = n_local if t.overlap else p.largest_layer_params  # foreach on GPUs only
        scratch = optimizer_scratch(at_once, shape.optimizer_moments)
        return Memory(
            params, grads, optimizer, activations, buffers, 0.0, scratch, self.grads_freed
        )

    def compute_s(self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> float:
        """Forward + backward over the accumulation steps, the optimizer step over the whole
        model, and the loop's own per-step work."""
        rate, micro = t.rate(), c.micro_batch
        compute = shape.grad_accum_steps * rate.fwd_bwd(micro)
        return compute + rate.optimizer_s + rate.loop(micro * shape.grad_accum_steps)

    def exchange_s(
        self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape
    ) -> tuple[float, float]:
        """Seconds per step of its exchange before overlap: (what a GPU hides under the
        backward pass, what stays on the critical path). Default: none."""
        return 0.0, 0.0

    def family(self, c: Candidate) -> str | None:
        """The probe family whose residual row `c` pays (None: not probed)."""
        return None

    def probed_step_s(
        self, family: str, c: Candidate, p: ModelProfile, shape: JobShape, fitted: dict
    ) -> float:
        """The family's residual per step at 2 ranks for this model: the job's own probed
        step where there is one (never below 0: an over-priced probe is noise, not a cost
        that grows with the ranks), else `fixed + per_module x modules`."""
        if f"{family}/step" in fitted:
            return max(fitted[f"{family}/step"], 0.0)
        modules = p.param_modules / c.pipeline_stages
        per_step = fitted.get(f"{family}/fixed", 0.0)
        return per_step + fitted.get(f"{family}/per_module", 0.0) * modules

    def residual_s(
        self, family: str, c: Candidate, p: ModelProfile, shape: JobShape, fitted: dict
    ) -> float:
        """Row `c`'s share of its family's residual: one per ring step, `N - 1` of them."""
        return self.probed_step_s(family, c, p, shape, fitted) * (c.data_parallel - 1)
