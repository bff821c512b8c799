"""Row tables: parameters with sparse gradients, pushed and pulled by the rows a batch touches.

An `nn.Embedding` or `nn.EmbeddingBag` built with `sparse=True` produces a gradient holding
only the rows its input looked up. Under `ps` such a weight is a *row table*: it is cut by row
index over every server shard (shard `s` of `S` holds rows `s, s + S, ...`), and

- before the module runs (a forward pre-hook), the worker pulls exactly the rows its input
  names from the shards that hold them, by the same waiting rule as a dense pull (sync: the
  previous step's update is applied), and writes them into its local copy of the table;
- after backward, the worker pushes the coalesced gradient as (row ids, row values), each
  shard getting its own rows; the shard's optimizer steps on a sparse gradient (sgd, adagrad,
  lazy_adam), exactly as it would on one device with the whole table: adagrad and lazy_adam
  touch only those rows, sgd's momentum the rows it has seen.

The worker's copy of a table is only valid at the rows its current batch touched; the
strategy reads whole tables from the servers (checkpoints, exported weights).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from roundhouse.models.sparse import has_sparse_gradients, sparse_modules
from roundhouse.parallel.ps.protocol import ParameterStore

logger = logging.getLogger(__name__)

__all__ = ["RowTables", "RowTraffic", "coalesced_rows", "has_sparse_gradients", "sparse_modules"]


@dataclass
class RowTraffic:
    """Bytes this worker sent and received for row tables (ids and values), since creation."""

    pushed: int = 0
    pulled: int = 0


class RowTables:
    """A worker's row tables: pulls before each lookup, pushes after backward.

    Args:
        modules: The sparse embedding modules (`sparse_modules`).
        indices: Each module weight's global parameter index (the servers' key).
        store: The parameter store.
        pusher: This worker's pusher id (row tables are pushed per rank, weight 1).
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        indices: Sequence[int],
        store: ParameterStore,
        pusher: int,
    ) -> None:
        self.modules, self.indices = list(modules), list(indices)
        self.store, self.pusher = store, pusher
        self.num_shards = store.num_servers
        self.step = 0  # the step whose parameters a lookup needs (set by the strategy)
        self.traffic = RowTraffic()
        self.handles = [
            m.register_forward_pre_hook(self._make_hook(g))
            for m, g in zip(self.modules, self.indices, strict=True)
        ]

    def _make_hook(self, table: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self.pull(module, table, args[0])

        return hook

    def _split(self, rows: Tensor) -> list[tuple[int, Tensor]]:
        """`rows` by the shard holding them: `[(shard, its rows)]`, shards with none left out."""
        owner = rows % self.num_shards
        parts = [(s, rows[owner == s]) for s in range(self.num_shards)]
        return [(s, r) for s, r in parts if r.numel()]

    @torch.no_grad()
    def pull(self, module: nn.Module, table: int, ids: Tensor) -> None:
        """Fetch the rows `ids` names (less the padding row) into `module.weight`."""
        rows = ids.detach().reshape(-1).unique()
        if module.padding_idx is not None:
            rows = rows[rows != module.padding_idx]
        parts = self._split(rows.cpu())
        if not parts:
            return
        shards = [s for s, _ in parts]
        values = self.store.pull_rows(
            shards, self.pusher, self.step, table, [r.numpy() for _, r in parts]
        )
        weight = module.weight
        for (_, r), v in zip(parts, values, strict=True):
            weight[r.to(weight.device)] = torch.from_numpy(np.asarray(v)).to(weight)
            if module.training:  # training traffic only (evaluation pulls are not a step's)
                self.traffic.pulled += r.numel() * 8 + np.asarray(v).nbytes

    def push(self, step: int) -> None:
        """Push every table's gradient of `step` to the shards (each its rows), drop it.

        Every shard gets a push for every table, with no rows where the batch touched none of
        its rows: the shard counts the pusher's gradient of `step` complete only then.
        """
        for module, table in zip(self.modules, self.indices, strict=True):
            weight = module.weight
            rows, values = coalesced_rows(weight.grad, weight.shape[1:])
            owner = rows % self.num_shards
            for shard in range(self.num_shards):
                mine = owner == shard
                r, v = rows[mine].numpy(), values[mine].numpy()
                self.store.push_rows(shard, self.pusher, step, table, r, v, 1)
                self.traffic.pushed += r.nbytes + v.nbytes
            weight.grad = None

    @torch.no_grad()
    def pull_all(self) -> None:
        """Fetch every row of every table (whole weights for export or a comparison)."""
        for module, table in zip(self.modules, self.indices, strict=True):
            ids = torch.arange(module.weight.shape[0], device=module.weight.device)
            self.pull(module, table, ids)

    def close(self) -> None:
        """Remove the lookup hooks."""
        for handle in self.handles:
            handle.remove()


def coalesced_rows(grad: Tensor | None, row_shape: torch.Size) -> tuple[Tensor, Tensor]:
    """(unique row ids `(n,)`, summed rows `(n, *row_shape)`) of a gradient, on the CPU, fp32.

    A sparse gradient is coalesced (a row looked up twice is summed); a dense one (a table
    built without `sparse=True` would not be a row table, but a gradient may still arrive
    dense) keeps its non-zero rows. None: no rows.
    """
    if grad is None:
        return torch.zeros(0, dtype=torch.int64), torch.zeros((0, *row_shape))
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0].cpu(), grad.values().float().cpu()
    dense = grad.detach().float().cpu()
    rows = dense.reshape(dense.shape[0], -1).abs().sum(1).nonzero()[:, 0]
    return rows, dense[rows]
