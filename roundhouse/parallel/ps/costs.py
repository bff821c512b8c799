"""The parameter server's cost model for `roundhouse plan`.

Every worker pushes its gradients and pulls the parameters each step; a sync pull waits for
every push, so the servers' links carry `2 x N x gradient bytes / num_servers` on the critical
path. Its buffer: the pulled parameters' staging copy. Its probe family `ps` is also probed on
a wide model (its bytes go through the servers' transport, not gloo, and a server sums and
steps them alone): `+ per_param x parameters / num_servers`, paid once per pusher the server
serves one after another (`N / 2` at the probe's 2).
"""

from __future__ import annotations

from typing import Any

from roundhouse.parallel.costs import (
    WORKERS_PROBED,
    Candidate,
    CostModel,
    JobShape,
    ModelProfile,
    Target,
)
from roundhouse.parallel.ps.section import PSStrategyConfig


class PSCosts(CostModel):
    """Synchronous data parallel through the parameter servers."""

    solo_rows = False  # on one worker the servers only add a round trip
    wide_probes = ("ps",)
    job_settings = ("num_servers",)

    @property
    def row(self) -> dict[str, Any]:
        """The section its rows run: synchronous mode."""
        return {"kind": self.kind, "mode": "sync"}

    @property
    def probes(self) -> dict[str, tuple[str, dict[str, Any]]]:  # type: ignore[override]
        """Its one probe family, `ps`, predicted by its own row."""
        return {"ps": (self.kind, self.row)}

    def sections(self, workers: int, profile: ModelProfile) -> list[tuple[str, dict[str, Any]]]:
        """One synchronous row at any worker count."""
        return [(self.kind, self.row)]

    def servers(self, shape: JobShape) -> int:
        """Server shards: the job's `strategy.num_servers`, else the schema's default."""
        return self.setting("num_servers", shape, PSStrategyConfig)

    def buffers(self, c: Candidate, shape: JobShape, n_local: float) -> float:
        """The pulled parameters' staging copy."""
        return 4 * n_local

    def exchange_s(
        self, c: Candidate, p: ModelProfile, t: Target, shape: JobShape
    ) -> tuple[float, float]:
        """Push and pull through the servers, on the critical path (a sync pull waits)."""
        n, grad_bytes = c.data_parallel, 4 * self.exchanged(c, p, shape)
        server_bytes = n * 2 * grad_bytes / self.servers(shape)
        return 0.0, 2 * t.link.latency_s + server_bytes / t.link.bytes_per_s

    def exchanged(self, c: Candidate, p: ModelProfile, shape: JobShape) -> float:
        """Elements a worker pushes (and pulls) per step: the dense parameters, and of the row
        tables (sparse-gradient embeddings) only the rows its micro-batches look up."""
        looked_up = c.micro_batch * shape.grad_accum_steps * p.row_elements_per_sample
        return self.local_params(c, p) - p.row_params + min(looked_up, p.row_params)

    def family(self, c: Candidate) -> str | None:
        """Every ps row pays the `ps` residual."""
        return "ps"

    def residual_s(
        self, family: str, c: Candidate, p: ModelProfile, shape: JobShape, fitted: dict
    ) -> float:
        """Per step plus per parameter (each shard its part, in parallel), once per pusher."""
        per_step = self.probed_step_s(family, c, p, shape, fitted)
        if f"{family}/step" not in fitted:
            per_param = fitted.get(f"{family}/per_param", 0.0)
            per_step += per_param * self.exchanged(c, p, shape) / self.servers(shape)
        return per_step * c.data_parallel / WORKERS_PROBED
