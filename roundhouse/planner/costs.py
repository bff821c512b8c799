"""One candidate's prediction: the shared composition of every strategy's cost model.

Step time = compute + exposed communication. The candidate's strategy prices its own memory,
compute and exchange (`Strategy.cost_model`, see `roundhouse.parallel.costs` and each strategy
package's `costs.py`); this module adds what every row shares:

- overlap: on a GPU, gradient exchange overlaps the backward pass (bucketed hooks, ZeRO's
  overlap_comm): only what does not fit under the backward (2/3 of compute) is exposed. On a
  CPU the same cores compute and communicate, so all of it is exposed;
- the loop's finite-loss check: one scalar all-reduce per step on more than one worker;
- on this machine's CPU, the row's family residual (what the strategy's exchange path cost per
  step beyond the link model at 2 ranks, `roundhouse.calibration.exchange`), scaled to the row
  by its cost model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from roundhouse.parallel.costs import (
    BACKWARD_SHARE,
    Candidate,
    JobShape,
    Memory,
    ModelProfile,
    Target,
    collective_s,
)


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


def comm_time(c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> tuple[float, float]:
    """Seconds per step of the candidate's exchange before overlap: (gradient exchange, which
    a GPU hides under the backward pass; model-parallel traffic on the critical path)."""
    return c.costs.exchange_s(c, p, t, shape)


def residual_s(c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> float:
    """Row `c`'s share of its family's probed residual (0 on one worker or unprobed)."""
    family = c.costs.family(c)
    if c.workers <= 1 or family is None:
        return 0.0
    return c.costs.residual_s(family, c, p, shape, t.residuals())


def evaluate(c: Candidate, p: ModelProfile, t: Target, shape: JobShape) -> Row:
    """The full prediction for candidate `c`."""
    memory = c.costs.memory(c, p, t, shape)
    compute = c.costs.compute_s(c, p, t, shape)
    hideable, critical = comm_time(c, p, t, shape)
    if t.overlap:
        hideable = max(hideable - BACKWARD_SHARE * compute, 0.0)
    check = collective_s(t.link, 0.0, 1, c.workers)  # the loop's finite-loss check (a scalar)
    comm = hideable + critical + check + residual_s(c, p, t, shape)
    return Row(c, c.micro_batch, memory, compute, comm, fits=memory.total <= t.memory_bytes)
