"""The ring all-reduce's cost model for `roundhouse plan`.

Each rank sends and receives `2(N-1)/N` of the gradient bytes per step, in buckets of
`strategy.bucket_mb` (two collective phases per bucket), which a GPU overlaps with the backward
pass. Its buffers: one bucket in flight and one filling. Its probe family `ring` pays the
residual of its communication thread's hand-offs once per ring step (`N - 1` of them).
"""

from __future__ import annotations

import math
from typing import Any

from roundhouse.parallel.costs import (
    Candidate,
    CostModel,
    JobShape,
    ModelProfile,
    Target,
    collective_s,
)
from roundhouse.parallel.ring.section import RingStrategyConfig


class RingCosts(CostModel):
    """Plain data parallel through the bucketed ring all-reduce."""

    solo_rows = False  # on one worker a ring is the one-device strategy with extra buffers
    grads_freed = True  # its buckets are separate buffers; the optimizer frees the gradients
    job_settings = ("bucket_mb",)

    @property
    def probes(self) -> dict[str, tuple[str, dict[str, Any]]]:  # type: ignore[override]
        """Its one probe family, `ring`, predicted by its own row."""
        return {"ring": (self.kind, {"kind": self.kind})}

    def sections(self, workers: int, profile: ModelProfile) -> list[tuple[str, dict[str, Any]]]:
        """One row at any worker count."""
        return [(self.kind, {"kind": self.kind})]

    def bucket_bytes(self, shape: JobShape) -> float:
        """Bytes of one bucket: the job's `strategy.bucket_mb`, else the schema's default."""
        return self.setting("bucket_mb", shape, RingStrategyConfig) * 2**20

    def buffers(self, c: Candidate, shape: JobShape, n_local: float) -> float:
        """A bucket in flight and one filling; under live recovery, a copy of the step's own
        fp32 gradients as well (see `OverlappedAllReduce(keep_local=True)`)."""
        kept = 4 * n_local if shape.live_recovery else 0.0
        return 2 * self.bucket_bytes(shape) + kept

    def exchange_s(
        self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape
    ) -> tuple[float, float]:
        """`2(N-1)/N` of the gradient bytes in `2 x buckets` calls, all of it hideable."""
        n, grad_bytes = c.data_parallel, 4 * self.local_params(c, p)
        buckets = math.ceil(grad_bytes / self.bucket_bytes(shape))
        return collective_s(t.link, 2 * (n - 1) / n * grad_bytes, 2 * buckets, n), 0.0

    def family(self, c: Candidate) -> str | None:
        """Every ring row pays the `ring` residual."""
        return "ring"
