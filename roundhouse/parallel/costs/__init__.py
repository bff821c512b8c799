"""The cost-model seam: how `roundhouse plan` prices a strategy, declared by the strategy.

Every strategy package may define a `CostModel` (its candidate layouts, per-rank memory,
compute and exchange time, and the probes that calibrate its exchange path) and name it on its
`Strategy` class as `cost_model`. The planner (`roundhouse.planner`) iterates the strategy
registry and asks each cost model; it never names a strategy. This package holds the shared
vocabulary (profile, rates, memory formulas, `Candidate`) and is pure arithmetic: no torch.
"""

from roundhouse.parallel.costs.memory import (
    Memory,
    activation_bytes,
    optimizer_moments,
    optimizer_scratch,
    plain_states,
    tensor_parallel_activation_share,
)
from roundhouse.parallel.costs.model import (
    BACKWARD_SHARE,
    WORKERS_PROBED,
    Candidate,
    CostModel,
    JobShape,
    LinkRate,
    StepRate,
    Target,
    collective_s,
)
from roundhouse.parallel.costs.profile import LayerProfile, ModelProfile

__all__ = [
    "BACKWARD_SHARE",
    "WORKERS_PROBED",
    "Candidate",
    "CostModel",
    "JobShape",
    "LayerProfile",
    "LinkRate",
    "Memory",
    "ModelProfile",
    "StepRate",
    "Target",
    "activation_bytes",
    "collective_s",
    "optimizer_moments",
    "optimizer_scratch",
    "plain_states",
    "tensor_parallel_activation_share",
]
