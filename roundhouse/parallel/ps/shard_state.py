"""A shard's optimizer and its checkpoint state: building, loading, consolidating.

Dense parameters live whole on one shard. A *row table* (a parameter with sparse gradients,
`roundhouse.parallel.ps.rows`) is cut by row index over every shard: shard `s` of `S` holds rows
`s, s + S, s + 2S, ...` as one local tensor (`row_part`), with the optimizer state of those rows.
Checkpoints hold every table whole, interleaved back from the shards' parts (`merge_row_parts`),
so they load at another number of shards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def row_part(full: torch.Tensor, shard: int, num_shards: int) -> torch.Tensor:
    """Rows `shard, shard + num_shards, ...` of `full` (a table's part on one shard), a copy."""
    return full[shard::num_shards].clone()


def merge_row_parts(parts: dict[int, torch.Tensor], num_shards: int) -> torch.Tensor:
    """The whole table from every shard's `row_part` (`parts[shard]`); sparse parts densified."""
    dense = {s: p.to_dense() if p.is_sparse else p for s, p in parts.items()}
    first = dense[0]
    total = sum(p.shape[0] for p in dense.values())
    full = torch.empty((total, *first.shape[1:]), dtype=first.dtype)
    for shard, part in dense.items():
        full[shard::num_shards] = part
    return full


def is_per_row(value: Any, num_rows: int) -> bool:
    """Whether an optimizer state entry holds one slice per table row (else a scalar, say)."""
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == num_rows


def use_foreach(optimizer: torch.optim.Optimizer) -> None:
    """The multi-tensor implementation, where the optimizer has one and the job left it open.

    torch picks it by itself only for CUDA tensors; on CPU a shard's update otherwise costs one
    round of Python-dispatched operations per parameter, on the step's critical path. A fused
    optimizer (roundhouse's Adam/AdamW, `trainer.optim.fused_or_default`) is left as it is.
    """
    for group in optimizer.param_groups:
        if "foreach" in group and group["foreach"] is None and not group.get("fused"):
            group["foreach"] = True


def build_shard_optimizer(
    build_optimizer: Callable[..., torch.optim.Optimizer],
    params: list[torch.Tensor],
    indices: list[int],
) -> torch.optim.Optimizer | None:
    """The job's optimizer (`ServerSetup.build_optimizer`) over this shard; a grouping factory
    also gets the global indices (its parameter groups go by name, see
    `trainer.optim.OptimizerFactory`)."""
    if not params:
        return None
    if hasattr(build_optimizer, "groups_of"):
        return build_optimizer(params, indices=indices)
    return build_optimizer(params)


def load_shard_state(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    indices: list[int],
    state: dict[str, Any],
    params: list[torch.Tensor],
) -> None:
    """Load the consolidated optimizer/scheduler `state` for the parameters `indices`."""
    opt = state["optimizer"]
    per_param = {i: opt["state"][g] for i, g in enumerate(indices) if g in opt["state"]}
    # Saved state is keyed by position in this shard; each live group lists its own positions.
    position = {id(p): i for i, p in enumerate(params)}
    groups = [
        dict(saved, params=[position[id(p)] for p in mine["params"]])
        for saved, mine in zip(opt["param_groups"], optimizer.param_groups, strict=True)
    ]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    if state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])


def consolidate_states(shard_states: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge shard `state_dict`s into one state keyed by global parameter index.

    Row tables come back whole (every shard's rows interleaved, with their optimizer state).
    """
    used = [s for s in shard_states if s["params"]]
    params: dict[int, torch.Tensor] = {}
    per_param: dict[int, Any] = {}
    for s in used:
        params.update(s["params"])
        per_param.update(s["optimizer"]["state"])
    for g, (table, opt) in merge_table_states(used).items():
        params[g] = table
        per_param[g] = opt
    first = used[0] if used else {"optimizer": {"param_groups": []}, "scheduler": None}
    return {
        "params": params,
        "optimizer": {"state": per_param, "param_groups": first["optimizer"]["param_groups"]},
        "scheduler": first["scheduler"],
        "updates": max((s["updates"] for s in used), default=0),
        "num_pushers": max((s.get("num_pushers", 0) for s in used), default=0),
    }


def slice_table_state(
    state: dict[str, Any], tables: dict[int, int], shard: int, num_shards: int
) -> dict[str, Any]:
    """`state` (consolidated) with each row table's optimizer state cut to `shard`'s rows.

    `tables`: global index -> the table's whole row count.
    """
    per_param = dict(state["optimizer"]["state"])
    for g, num_rows in tables.items():
        if g in per_param:
            per_param[g] = {
                k: row_part(v, shard, num_shards) if is_per_row(v, num_rows) else v
                for k, v in per_param[g].items()
            }
    return {**state, "optimizer": {**state["optimizer"], "state": per_param}}


def merge_table_states(shard_states: list[dict[str, Any]]) -> dict[int, Any]:
    """Whole tables and their optimizer state from the shards' `state_dict`s (row tables only).

    Returns `{g: (table, optimizer_state)}` for every row table `g`.
    """
    merged: dict[int, Any] = {}
    with_tables = [s for s in shard_states if s.get("tables")]
    for g in with_tables[0]["tables"] if with_tables else {}:
        num_shards = with_tables[0]["num_shards"]
        parts = {s["shard"]: s["params"][g] for s in with_tables}
        states = {s["shard"]: s["optimizer"]["state"].get(g, {}) for s in with_tables}
        num_rows = {s: p.shape[0] for s, p in parts.items()}
        opt = {
            k: merge_row_parts({s: states[s][k] for s in states}, num_shards)
            if all(is_per_row(states[s].get(k), num_rows[s]) for s in states)
            else v
            for k, v in states[0].items()
        }
        merged[g] = (merge_row_parts(parts, num_shards), opt)
    return merged
