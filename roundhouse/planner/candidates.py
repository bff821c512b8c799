"""Every strategy that can run a job on N workers, asked of the strategy registry.

Each registered strategy's cost model offers its rows (`CostModel.sections`): the `strategy`
dict a job file would hold, so the chosen row of a plan is exactly what `strategy.kind: auto`
hands to the launcher. What the model allows comes from its trace (pipeline stages need
`pipeline_layers` without weights tied across them, and so on: each cost model decides). On
one worker, strategies whose `solo_rows` is off (a ring of one) are listed only where the
one-device reference is not among the allowed kinds (an elastic group's floor).
"""

from __future__ import annotations

from typing import Any

from roundhouse.parallel.costs import Candidate, JobShape, ModelProfile
from roundhouse.parallel.registry import cost_model_for, cost_models, reference_allowed


def enumerate_candidates(
    workers: int, profile: ModelProfile, shape: JobShape, kinds: tuple[str, ...] | None = None
) -> list[Candidate]:
    """Every candidate for `workers` workers, limited to `kinds` (strategy kinds) if given."""
    solo_only = workers == 1 and reference_allowed(kinds)
    rows = []
    for costs in cost_models(kinds):
        if solo_only and not costs.solo_rows:
            continue
        rows += costs.candidates(workers, profile, shape)
    return rows


def candidate(label: str, workers: int, strategy: dict[str, Any], shape: JobShape) -> Candidate:
    """The candidate for one `strategy` section, priced by its kind's cost model."""
    return cost_model_for(strategy).candidate(label, workers, strategy, shape)
