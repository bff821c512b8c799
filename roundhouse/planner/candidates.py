"""Every strategy that can run a job on N workers, as `strategy` sections of the job schema.

Each candidate is the `strategy` dict a job file would hold, so the chosen row of a plan is
exactly what `strategy.kind: auto` hands to the launcher. What the model allows comes from its
trace: pipeline stages need `pipeline_layers` without weights tied across them, tensor parallel
needs attention/MLP maps and a head count the size divides, expert parallel an MoE model whose
expert count the size divides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from roundhouse.planner.trace import ModelProfile


@dataclass(frozen=True)
class Candidate:
    """One way to run the job on `workers` workers."""

    label: str
    workers: int
    strategy: dict[str, Any]

    @property
    def pipeline_stages(self) -> int:
        """Pipeline stages of this candidate (1 without pipeline parallel)."""
        return int(self.strategy.get("pipeline_stages", 1))

    @property
    def tensor_parallel(self) -> int:
        """Tensor-parallel degree (1 without tensor parallel)."""
        return int(self.strategy.get("tensor_parallel", 1))

    @property
    def expert_parallel(self) -> int:
        """Expert-parallel degree (1 without expert parallel)."""
        return int(self.strategy.get("expert_parallel", 1))

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: the workers over pipeline x tensor parallel."""
        return self.workers // (self.pipeline_stages * self.tensor_parallel)


def divisors_above_one(n: int) -> list[int]:
    """The divisors of `n` from 2 up to `n`."""
    return [d for d in range(2, n + 1) if n % d == 0]


def zero_candidates(workers: int) -> list[Candidate]:
    """DeepSpeed ZeRO 0-3, and CPU offload of the optimizer (1-3) and of parameters (3)."""
    rows = [
        Candidate(f"zero{stage}", workers, {"kind": "deepspeed", "zero_stage": stage})
        for stage in range(4)
    ]
    for stage in (1, 2, 3):
        rows.append(
            Candidate(
                f"zero{stage}+offload",
                workers,
                {"kind": "deepspeed", "zero_stage": stage, "offload_optimizer": "cpu"},
            )
        )
    rows.append(
        Candidate(
            "zero3+offload-params",
            workers,
            {
                "kind": "deepspeed",
                "zero_stage": 3,
                "offload_optimizer": "cpu",
                "offload_params": "cpu",
            },
        )
    )
    return rows


def model_parallel_candidates(workers: int, profile: ModelProfile) -> list[Candidate]:
    """Pipeline, tensor and expert parallel sizes the model and `workers` allow."""
    rows = []
    if profile.layers and not profile.tied_across_layers:
        for stages in divisors_above_one(workers):
            if stages <= len(profile.layers) and not profile.num_experts:
                strategy = {"kind": "deepspeed", "zero_stage": 1, "pipeline_stages": stages}
                rows.append(Candidate(f"pipeline{stages}", workers, strategy))
    if profile.num_heads:
        for tp in divisors_above_one(workers):
            if profile.num_heads % tp == 0:
                strategy = {"kind": "deepspeed", "zero_stage": 1, "tensor_parallel": tp}
                rows.append(Candidate(f"tp{tp}", workers, strategy))
    if profile.num_experts:
        for ep in divisors_above_one(workers):
            if profile.num_experts % ep == 0:
                strategy = {"kind": "deepspeed", "zero_stage": 2, "expert_parallel": ep}
                rows.append(Candidate(f"ep{ep}", workers, strategy))
    return rows


def enumerate_candidates(
    workers: int, profile: ModelProfile, kinds: tuple[str, ...] | None = None
) -> list[Candidate]:
    """Every candidate for `workers` workers, limited to `kinds` (strategy kinds) if given."""
    data_parallel = [
        Candidate("ring", workers, {"kind": "ring"}),
        Candidate("ps", workers, {"kind": "ps", "mode": "sync"}),
    ]
    if workers == 1:  # ring and ps on one worker only where asked for (an elastic group's floor)
        only_asked = kinds is not None and "single" not in kinds
        data_parallel = (
            data_parallel if only_asked else [Candidate("single", 1, {"kind": "single"})]
        )
    rows = data_parallel
    rows += zero_candidates(workers)
    if workers > 1:
        rows += model_parallel_candidates(workers, profile)
    return [row for row in rows if kinds is None or row.strategy["kind"] in kinds]
