"""`ShardServer`: one parameter-server shard, its optimizer state and the job's lr schedule.

The same class runs in this process (the in-process store of `--local`) and as a Ray actor
(`roundhouse.cluster.services` wraps it with `ray.remote`, as a threaded actor). Every method is
thread-safe: a pull that must wait (sync, ssp) blocks on a condition variable while pushes from
other workers go on in other threads.

Pushers are the parties that send gradients: every worker, or with node aggregation one leader
per node. A push carries the *sum* of `weight` workers' loss-scaled gradients for some of the
shard's parameters at one step; a pusher's gradient for a step is complete once every parameter
of the shard arrived (in any number of pushes, in any order).

Modes:
- `sync` (BSP): the update for step t is applied once every pusher's gradient for t arrived:
  the sum over pushers divided by the world size (the loop's loss scaling makes that the
  gradient of the global batch). A pull for step t waits until t updates were applied.
- `async` (ASP): each pusher's complete gradient is applied on arrival, as its own optimizer step
  on the *average over that pusher's workers* (so each update is a regular step on that
  pusher's share of the batch). The lr schedule advances once per `num_pushers` updates, i.e.
  per global step. Pulls never wait.
- `ssp`: applied as in async; a pull for step t waits until the slowest pusher has completed
  at least `t - staleness` steps.

Shard 0 also hands out the training data under dynamic assignment (`claim`): one counter per
epoch, shared by every worker, so a fast worker trains on more of the epoch than a slow one.
A pusher that found the epoch's data used up is *idle* (`set_idle`, on every shard) until it
claims again: every gradient it computed has been pushed, so the ssp bound (and the reported
staleness) counts only the pushers that still train; else a fast worker that ran ahead would
wait forever for steps the slow one will never take.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from roundhouse.parallel.ps.resize import ResizableShard, ServerResetError
from roundhouse.parallel.ps.shard_state import (
    build_shard_optimizer,
    load_shard_state,
    row_part,
    slice_table_state,
    use_foreach,
)
from roundhouse.parallel.ps.wire import WireAddress, WireListener

logger = logging.getLogger(__name__)


class ServerNotReadyError(RuntimeError):
    """The shard was called before `initialize` (for example after the actor restarted)."""


@dataclass
class ServerSetup:
    """How a shard trains: mode, who pushes, and the job's optimizer and schedule factories."""

    mode: str  # sync | async | ssp
    staleness: int
    num_pushers: int
    world_size: int  # sync: the summed gradients are divided by this
    build_optimizer: Callable[..., torch.optim.Optimizer]
    build_scheduler: Callable[..., Any]
    timeout_s: float = 600.0
    # Row tables (sparse-gradient parameters): global index -> whole row count. Every shard
    # holds rows `shard, shard + num_shards, ...` of each (`shard_state.row_part`).
    row_tables: dict[int, int] = field(default_factory=dict)
    num_shards: int = 1
    # The shard's place among the `num_shards` that cut the row tables: its own id, unless the
    # store is one optimizer's share of the servers (`ShardSubset`).
    row_shard: int | None = None


@dataclass
class PullReply:
    """A shard's parameters (flat, in the shard's index order) and what the last update did."""

    flat: np.ndarray
    version: int  # updates applied so far
    lr: float  # lr of the last update (the current lr before any)
    grad_sq_norm: float | None  # squared norm of the last applied gradient on this shard
    ahead: int  # steps the pulling pusher is ahead of the slowest pusher


class _Pending:
    """Gradients received for one update: per pusher, per parameter index, plus weights."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[int, np.ndarray | None]] = {}
        self.weights: dict[int, int] = {}

    def add(self, pusher: int, grads: dict[int, np.ndarray | None], weight: int) -> None:
        mine = self.grads.setdefault(pusher, {})
        overlap = mine.keys() & grads.keys()
        assert not overlap, f"pusher {pusher} sent parameters {sorted(overlap)} twice"
        mine.update(grads)
        self.weights[pusher] = weight

    def complete(self, pusher: int, size: int) -> bool:
        return len(self.grads.get(pusher, ())) == size


class ShardServer(ResizableShard):
    """One shard of the parameters with its optimizer and scheduler.

    Args:
        shard_id: this shard's number (for logs).
        num_threads: torch threads for the update arithmetic.
    """

    def __init__(self, shard_id: int = 0, num_threads: int | None = None) -> None:
        self.shard_id = shard_id
        if num_threads is not None:
            torch.set_num_threads(max(1, num_threads))
        self.cond = threading.Condition()
        self.generation = 0
        self.setup: ServerSetup | None = None
        self.listener: WireListener | None = None  # the data path, once a worker asks for it
        self.listener_lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------------

    def ping(self) -> int:
        """Liveness check; returns the shard id."""
        return self.shard_id

    def wire_address(self) -> WireAddress:
        """Where this shard serves dense pushes and pulls over TCP (`ps/wire.py`); the
        listener starts on the first call and lives as long as the shard."""
        with self.listener_lock:
            if self.listener is None:
                self.listener = WireListener(self)
            return self.listener.address

    def initialize(
        self,
        setup: ServerSetup,
        indices: list[int],
        arrays: list[np.ndarray],
        state: dict[str, Any] | None = None,
        step: int = 0,
    ) -> None:
        """(Re)start the shard with parameters `arrays` (global indices `indices`).

        `state` is the consolidated optimizer/scheduler state (`consolidate_states` format) or
        None for a fresh optimizer. `step` is every pusher's clock (the step to resume at).
        Calls waiting on the previous generation fail with `ServerResetError`.
        """
        with self.cond:
            self.generation += 1
            self.setup = setup
            dense = [
                (g, a) for g, a in zip(indices, arrays, strict=True) if g not in setup.row_tables
            ]
            self._build_dense(dense)
            self._build_tables(setup, indices, arrays)
            everything = self.params + self.tables
            self.optimizer = build_shard_optimizer(
                setup.build_optimizer, everything, self.all_indices
            )
            if self.optimizer is not None:
                use_foreach(self.optimizer)
            self.scheduler = setup.build_scheduler(self.optimizer) if everything else None
            if state is not None and everything:
                state = slice_table_state(state, setup.row_tables, self.row_shard, setup.num_shards)
                load_shard_state(
                    self.optimizer, self.scheduler, self.all_indices, state, everything
                )
            # Steps each pusher has pushed in full, by pusher id (`resize` changes the ids).
            self.clocks = {p: step for p in range(setup.num_pushers)}
            self.version = step if setup.mode == "sync" else 0
            self.updates = 0 if state is None else int(state.get("updates", 0))
            self.pending: dict[Any, _Pending] = {}
            self.last_lr = self._current_lr()
            self.last_sq_norm: float | None = None
            self.claims: dict[int, int] = {}  # epoch -> next chunk to hand out
            self.idle: set[int] = set()  # pushers with no data left in their epoch
            self.cond.notify_all()
        logger.info("ps shard %d: %d parameters, mode %s", self.shard_id, len(arrays), setup.mode)

    def _build_dense(self, dense: list[tuple[int, np.ndarray]]) -> None:
        """The dense parameters: views into one flat vector, so a pull copies it in one go."""
        self.indices = [g for g, _ in dense]
        self.offsets = np.cumsum([0] + [np.size(a) for _, a in dense]).tolist()
        self.flat = torch.zeros(self.offsets[-1], dtype=torch.float32)
        self.params = []
        for i, (_, a) in enumerate(dense):
            view = self.flat[self.offsets[i] : self.offsets[i + 1]].view(np.shape(a))
            view.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))
            self.params.append(view)

    def _build_tables(self, setup: ServerSetup, indices: list[int], arrays: list) -> None:
        """This shard's rows of each row table (`arrays` holds them already cut, or whole)."""
        self.table_ids = [g for g in indices if g in setup.row_tables]
        self.tables = []
        for g, a in zip(indices, arrays, strict=True):
            if g in setup.row_tables:
                part = torch.as_tensor(np.asarray(a, dtype=np.float32))
                if part.shape[0] == setup.row_tables[g] and setup.num_shards > 1:
                    part = row_part(part, self.row_shard, setup.num_shards)
                self.tables.append(part.clone().requires_grad_(True))
        self.all_indices = self.indices + self.table_ids

    def _current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0

    @property
    def row_shard(self) -> int:
        """This shard's place among those that cut the row tables (`ServerSetup.row_shard`)."""
        place = self.setup.row_shard if self.setup is not None else None
        return self.shard_id if place is None else place

    def _ready(self) -> ServerSetup:
        if self.setup is None:
            raise ServerNotReadyError(f"parameter server shard {self.shard_id} not initialized")
        return self.setup

    # --- push ---------------------------------------------------------------------------------

    def push(
        self,
        pusher: int,
        step: int,
        indices: list[int],
        flat: np.ndarray,
        present: list[bool],
        weight: int = 1,
        pull_step: int | None = None,
    ) -> PullReply | None:
        """Receive gradient sums for `indices` (those `present` packed in order in `flat`).

        With `pull_step`, also `pull(pusher, pull_step)` and return its reply: a pusher's last
        push of a step asks for the next step's parameters in the same call (one round trip
        per step instead of two).
        """
        self._store(pusher, step, self._unflatten(indices, flat, present), weight)
        return None if pull_step is None else self.pull(pusher, pull_step)

    def push_rows(
        self,
        pusher: int,
        step: int,
        table: int,
        rows: np.ndarray,
        values: np.ndarray,
        weight: int = 1,
    ) -> None:
        """Receive the gradient sums of row table `table` for `rows` (global row ids, all on
        this shard; `values` `(len(rows), *row_shape)`; no rows: the pusher touched none).
        Counts towards the pusher's gradient of `step` like any dense parameter."""
        num_shards = self._ready().num_shards
        local = torch.as_tensor(np.asarray(rows, dtype=np.int64)) // num_shards
        grads = {table: (local, torch.as_tensor(np.asarray(values, dtype=np.float32)))}
        self._store(pusher, step, grads, weight)

    def pull_rows(self, pusher: int, step: int, table: int, rows: np.ndarray) -> np.ndarray:
        """The values of `rows` (global ids, on this shard) of row table `table` for `step`,
        once readable by `pull`'s waiting rule."""
        with self.cond:
            self._wait_readable(pusher, step)
            part = self.tables[self.table_ids.index(table)]
            local = torch.as_tensor(np.asarray(rows, dtype=np.int64)) // self.setup.num_shards
            return part.detach()[local].numpy()

    def _store(self, pusher: int, step: int, grads: dict[int, Any], weight: int) -> None:
        """Add a push to its pending update; apply the update once it is complete."""
        with self.cond:
            setup = self._ready()
            if self._stale_push(pusher, step):
                return
            key = step if setup.mode == "sync" else (pusher, step)
            pending = self.pending.setdefault(key, _Pending())
            pending.add(pusher, grads, weight)
            size = len(self.all_indices)
            if not pending.complete(pusher, size):
                return
            self.clocks[pusher] = max(self.clocks[pusher], step + 1)
            if setup.mode != "sync":
                self._apply(self.pending.pop(key), divisor=weight)
            elif all(pending.complete(p, size) for p in self.clocks):
                self._apply(self.pending.pop(key), divisor=setup.world_size)
                self.version += 1
            self.cond.notify_all()

    def _unflatten(
        self, indices: list[int], flat: np.ndarray, present: list[bool]
    ) -> dict[int, np.ndarray | None]:
        position = {g: i for i, g in enumerate(self.indices)}
        grads: dict[int, np.ndarray | None] = {}
        offset = 0
        for g, has in zip(indices, present, strict=True):
            if g not in position:
                raise ValueError(f"parameter {g} is not on shard {self.shard_id}")
            if has:
                n = self.params[position[g]].numel()
                grads[g] = flat[offset : offset + n]
                offset += n
            else:
                grads[g] = None
        return grads

    def _apply(self, pending: _Pending, divisor: int) -> None:
        """One optimizer (and schedule) step on the summed gradients of `pending`.

        The sum, scaling, norm and finiteness check run once over one flat buffer (the
        parameters' gradients are views into it): per-parameter small operations would cost
        as much as the optimizer step itself.
        """
        total = np.empty(self.offsets[-1], dtype=np.float32)
        has_grad = [False] * len(self.params)
        for pusher in sorted(pending.grads):
            grads = pending.grads[pusher]
            for i, g in enumerate(self.indices):
                part = grads[g]
                if part is not None:  # the first part is copied: no pass over zeros
                    window = total[self.offsets[i] : self.offsets[i + 1]]
                    if has_grad[i]:
                        np.add(window, part, out=window)
                    else:
                        np.copyto(window, part)
                    has_grad[i] = True
        for i, has in enumerate(has_grad):
            if not has:
                total[self.offsets[i] : self.offsets[i + 1]] = 0.0
        flat = torch.from_numpy(total).div_(divisor)
        # One float32 dot product (no float64 copy): the loop's own norms are float32 too.
        sq_norm = float(torch.dot(flat, flat)) if len(flat) else 0.0
        for i, param in enumerate(self.params):
            view = flat[self.offsets[i] : self.offsets[i + 1]].view_as(param)
            param.grad = view if has_grad[i] else None
        sq_norm += self._table_grads(pending, divisor)
        self.last_lr = self._current_lr()
        self.last_sq_norm = sq_norm
        if not math.isfinite(sq_norm):  # the loop skips (or stops at) this step; so do we
            logger.warning("ps shard %d: non-finite gradient, update skipped", self.shard_id)
        else:
            self.optimizer.step()
            self.updates += 1
            if self._schedule_due():
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _table_grads(self, pending: _Pending, divisor: int) -> float:
        """Each row table's summed sparse gradient (`.grad`, coalesced); their squared norm.

        A part none of whose rows a batch touched still gets an (empty) gradient: on one device
        the whole table has one, so the optimizer counts the step and applies momentum to the
        rows it holds, here as there.
        """
        sq_norm = 0.0
        for g, table in zip(self.table_ids, self.tables, strict=True):
            parts = [pending.grads[p][g] for p in sorted(pending.grads)]
            rows = torch.cat([rows for rows, _ in parts])
            values = torch.cat([values for _, values in parts]).div_(divisor)
            grad = torch.sparse_coo_tensor(rows[None], values, table.shape).coalesce()
            sq_norm += float(grad.values().double().square().sum())
            table.grad = grad
        return sq_norm

    def _schedule_due(self) -> bool:
        setup = self._ready()
        return setup.mode == "sync" or self.updates % setup.num_pushers == 0

    # --- dynamic data assignment --------------------------------------------------------------

    def claim(self, epoch: int, first: int, limit: int) -> int:
        """The next unclaimed chunk of `epoch` (counting from `first`), or -1 if none is left.

        The first claim of an epoch sets its counter to `first` (every worker passes the same
        resume position); earlier epochs' counters are dropped.
        """
        with self.cond:
            self._ready()
            chunk = self.claims.setdefault(epoch, first)
            for old in [e for e in self.claims if e < epoch]:
                del self.claims[old]
            if chunk >= limit:
                return -1
            self.claims[epoch] = chunk + 1
            return chunk

    def set_idle(self, pusher: int, idle: bool) -> None:
        """Mark `pusher` as out of data for its epoch (ssp stops waiting for it) or back."""
        with self.cond:
            self._ready()
            if idle:
                self.idle.add(pusher)
            else:
                self.idle.discard(pusher)
            self.cond.notify_all()

    # --- pull ---------------------------------------------------------------------------------

    def pull(self, pusher: int, step: int) -> PullReply:
        """The parameters a pusher about to compute `step` may use.

        Waits until the pusher's own gradients of every earlier step arrived (so a pull may be
        sent while its pushes are still on the way), then per the mode.
        """
        with self.cond:
            self._wait_readable(pusher, step)
            flat = self._flat_params()
            return PullReply(
                flat=flat,
                version=self.version if self.setup.mode == "sync" else self.updates,
                lr=self.last_lr,
                grad_sq_norm=self.last_sq_norm,
                ahead=max(0, step - self._slowest_clock(step)),
            )

    def _wait_readable(self, pusher: int, step: int) -> None:
        """Block (the condition held) until `pusher` may read the parameters for `step`."""
        deadline = time.monotonic() + self._ready().timeout_s
        generation = self.generation
        self._check_pusher(pusher)
        while not self._may_read(pusher, step):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"ps shard {self.shard_id}: pusher {pusher} waited for step {step} "
                    f"longer than {self._ready().timeout_s} s (clocks {self.clocks})"
                )
            self.cond.wait(timeout=min(left, 1.0))
            if self.generation != generation:
                raise ServerResetError(f"ps shard {self.shard_id} was re-initialized")

    def _may_read(self, pusher: int, step: int) -> bool:
        setup = self._ready()
        if self.clocks[pusher] < step:
            return False  # this pusher's own gradients of earlier steps are still on the way
        if setup.mode == "sync":
            return self.version >= step
        if setup.mode == "ssp":
            return self._slowest_clock(step) >= step - setup.staleness
        return True

    def _slowest_clock(self, step: int) -> int:
        """The lowest clock among pushers that still train (`step` if none does)."""
        return min((c for p, c in self.clocks.items() if p not in self.idle), default=step)

    def _flat_params(self) -> np.ndarray:
        return self.flat.numpy().copy()

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This shard's parameters and optimizer/scheduler state, keyed by global index."""
        with self.cond:
            self._ready()
            everything = self.params + self.tables
            params = {
                g: p.detach().clone() for g, p in zip(self.all_indices, everything, strict=True)
            }
            if self.optimizer is None:
                return {"params": params, "optimizer": {}, "scheduler": None, "updates": 0}
            opt = self.optimizer.state_dict()
            # state_dict numbers parameters group by group; map them back to global indices.
            position = {id(p): i for i, p in enumerate(everything)}
            chain = [p for group in self.optimizer.param_groups for p in group["params"]]
            per_param = {
                self.all_indices[position[id(p)]]: opt["state"][i]
                for i, p in enumerate(chain)
                if i in opt["state"]
            }
            groups = [
                {k: v for k, v in group.items() if k != "params"} for group in opt["param_groups"]
            ]
            return {
                "params": params,
                "optimizer": {"state": per_param, "param_groups": groups},
                "scheduler": self.scheduler.state_dict(),
                "updates": self.updates,
                "num_pushers": self.setup.num_pushers,
                "tables": {g: self.setup.row_tables[g] for g in self.table_ids},
                "shard": self.row_shard,
                "num_shards": self.setup.num_shards,
            }
