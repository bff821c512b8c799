"""The `ring` strategy's job-file section (torch-free: `roundhouse.config` imports it).

This module imports only pydantic and `roundhouse.sections`, so the job schema knows the
section without importing torch; the package's `__init__` stays lazy for the same reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt

from roundhouse.sections import StrategySection


class RingStrategyConfig(StrategySection):
    """roundhouse's bucketed ring all-reduce."""

    kind: Literal["ring"]
    bucket_mb: PositiveFloat = 25.0
    algorithm: Literal["ring", "native"] = "ring"
    hierarchical: bool = False
    grad_dtype: Literal["fp32", "bf16"] = "fp32"
    sparse_gradients: Literal["dense", "gather"] = Field(
        "dense",
        description="Sparse-gradient embeddings (`sparse=True`): all-reduce the whole table "
        "(`dense`) or all-gather the touched rows (`gather`).",
    )
    exact: bool = Field(
        False,
        description="Sum the gradients of `virtual_shards` fixed shards of each global batch in "
        "a fixed order: the weights do not depend on the number of workers (bit for bit).",
    )
    virtual_shards: PositiveInt = Field(
        8, description="exact: shards per global batch (at least cluster.num_workers)."
    )


__all__ = ["RingStrategyConfig"]
