"""`ps`: data parallel through parameter servers (sync, async or bounded-staleness).

Every worker computes gradients on its share of each global batch and pushes them, bucket by
bucket during backward, to the servers that own the parameters (size-balanced shards); the
servers hold the optimizer state, apply the job's optimizer and lr schedule, and the workers
pull the new parameters (prefetched in the background while the loop goes on). See
`roundhouse.parallel.ps.server` for what each mode means.

With `node_aggregation` the ranks of a node first sum their gradients onto the node's leader
(a torch.distributed group per node), only the leader pushes and pulls, and it broadcasts the
parameters to its node: one push and one pull per node instead of per worker.

The servers come from `ctx.services["ps"]` (its `services()`, started by `roundhouse.cluster`);
with one worker and none given, an in-process store is built (`--local`).

Dynamic data assignment (`strategy.data_assignment`, the default for async/ssp): the workers
claim each epoch's batches from a counter on server shard 0 instead of training on fixed
shares, so a fast worker is never held back by a straggler's share of the epoch. Each worker
then takes its own number of steps (its `train/steps`); epochs still end together (validation).
With node aggregation on nodes of several ranks, a node's ranks must step together: there the
assignment stays static.

Checkpoints hold the consolidated state (parameters, optimizer state per parameter, the
schedule), so they load at another number of workers or servers: the shards are re-cut.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.config import JobSpec, PSStrategyConfig
from roundhouse.errors import JobFileError, TrainingError
from roundhouse.parallel.base import StepStats, TrainPlan
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.ps import (
    LocalParameterStore,
    ParameterStore,
    ServerSetup,
    build_layout,
    consolidate_states,
    live,
    used_shards,
)
from roundhouse.parallel.ps.client import PSClient, Pulled, PusherRole
from roundhouse.parallel.ps.costs import PSCosts
from roundhouse.parallel.ps.remote import SERVICE, RemoteParameterStore, server_spec
from roundhouse.parallel.ps.rows import RowTables, sparse_modules
from roundhouse.parallel.ps.shard_state import row_part
from roundhouse.parallel.ps.subset import ShardSubset
from roundhouse.parallel.ring import build_node_groups
from roundhouse.parallel.ring.strategy import broadcast_module, check_process_group
from roundhouse.parallel.services import ServiceGroup, ServiceSpec
from roundhouse.parallel.single import SingleDeviceStrategy

logger = logging.getLogger(__name__)

BUCKET_MB = 4.0
SERVER_WAIT_S = 600.0  # a pull waiting longer than this for other workers fails


def check_no_grad_clip(grad_clip_norm: float | None) -> None:
    """Refuse `trainer.grad_clip_norm`: each server sees only its shard of the gradient."""
    if grad_clip_norm is not None:
        raise JobFileError(
            "trainer.grad_clip_norm is not supported with strategy.kind=ps "
            "(each server sees only its shard of the gradient)",
            "remove trainer.grad_clip_norm or use strategy.kind=ring",
        )


class ParameterServerStrategy(live.LiveServersMixin, SingleDeviceStrategy):
    """Workers compute gradients; parameter-server shards own the parameters and update them."""

    kind = "ps"
    cost_model = PSCosts
    max_world_size = None
    supports_live_recovery = True  # sync mode (`ps/live.py`; the recovery check refuses others)
    config: PSStrategyConfig

    @classmethod
    def services(cls, job: JobSpec) -> list[ServiceSpec]:
        """Its `strategy.num_servers` shard servers (`remote.server_spec`)."""
        return [server_spec(job)]

    @classmethod
    def local_services(cls) -> Any:
        """Server shards in a manager process of this machine (`manager.shard_manager`)."""
        from roundhouse.parallel.ps.manager import shard_manager

        return shard_manager()

    @classmethod
    def attach_local_services(cls, ctx: WorkerContext, address: Any, config: Any) -> WorkerContext:
        """`ctx` with a store over the manager's first `config.num_servers` shards."""
        import dataclasses

        from roundhouse.parallel.ps.manager import connect_store

        store = connect_store(address, config.num_servers)
        return dataclasses.replace(ctx, services={**ctx.services, SERVICE: store})

    @classmethod
    def check_job(cls, job: JobSpec, world_size: int) -> None:
        """Gradient clipping needs the whole gradient's norm, which no server sees; live
        recovery needs sync mode (`live.check_live_job`).

        Raises:
            JobFileError: `trainer.grad_clip_norm` is set, or live recovery cannot re-form.
        """
        check_no_grad_clip(job.trainer.grad_clip_norm)
        live.check_live_job(job, world_size)

    @classmethod
    def check_optimizers(cls, job: JobSpec, names: list[str]) -> None:
        """Each optimizer trains on its own servers: at least one server per optimizer.

        Raises:
            JobFileError: `strategy.num_servers` is below the number of optimizers.
        """
        if len(names) > job.strategy.num_servers:
            raise JobFileError(
                f"the task steps {len(names)} optimizers ({', '.join(names)}) but "
                f"strategy.num_servers={job.strategy.num_servers}",
                f"set strategy.num_servers to at least {len(names)} (one share per optimizer)",
            )

    @classmethod
    def split_context(cls, ctx: WorkerContext, index: int, count: int) -> WorkerContext:
        """Optimizer `index` of `count` pushes and pulls on its own share of the servers."""
        service = ctx.services.get(SERVICE)
        if service is None:
            return ctx  # one worker: each optimizer builds its own in-process store
        store = RemoteParameterStore(service) if isinstance(service, ServiceGroup) else service
        return dataclasses.replace(
            ctx, services={**ctx.services, SERVICE: ShardSubset(store, index, count)}
        )

    def __init__(self, config: PSStrategyConfig, ctx: WorkerContext) -> None:
        super().__init__(config, ctx)
        self.distributed = ctx.world_size > 1
        if self.distributed:
            check_process_group(ctx)
        self.store = build_store(config, ctx)
        self.client: PSClient | None = None
        self.clock = 0  # steps pushed by this worker (the tag of its next push)
        self.last: Pulled | None = None
        self.rows: RowTables | None = None  # the sparse-gradient tables, if the model has any
        self.logged = (0, 0)  # (clock, row bytes) at the last row-traffic report
        self.ahead: list[int] = []
        self.loaded_clock = -1  # the step whose parameters the model holds
        self.lag = 0  # live recovery: steps the servers applied beyond this worker's view
        self.dynamic = config.data_assignment == "dynamic"
        self.idle = False  # dynamic assignment: this worker found its epoch's data used up
        self.step_started: float | None = None  # straggler injection: when this step began
        if self.dynamic and config.node_aggregation and ctx.world_size > ctx.num_nodes:
            logger.warning(
                "ps: node aggregation steps a node's ranks together; static data assignment"
            )
            self.dynamic = False

    # --- setup --------------------------------------------------------------------------------

    def setup(self, model: nn.Module, plan: TrainPlan) -> None:
        """Build the model, the shard layout, the store and the client; rank 0 fills the shards."""
        check_no_grad_clip(plan.grad_clip_norm)  # a worker started without the launcher's checks
        self.plan = plan
        self.model = model.to(self.ctx.device)
        modules = sparse_modules(self.model)
        tables = [m.weight for m in modules]
        dense = [
            p
            for p in self.model.parameters()
            if p.requires_grad and all(p is not t for t in tables)
        ]
        self.params = dense + tables  # a parameter's place here is its index on the servers
        self.row_tables = {len(dense) + j: t.shape[0] for j, t in enumerate(tables)}
        if self.distributed:
            broadcast_module(self.model)  # buffers (and the servers' initial parameters)
        num_servers = self.store.num_servers
        self.layout = build_layout([p.numel() for p in dense], num_servers)
        # Row tables go to every shard and are pushed per rank: no node aggregation for them.
        self.role = build_role(self.config, self.ctx, aggregate=not tables)
        self.client = PSClient(
            dense,
            self.store,
            self.layout,
            self.role,
            bucket_mb=BUCKET_MB,
            shards=list(range(num_servers)) if tables else None,
        )
        if tables:
            self.rows = RowTables(modules, list(self.row_tables), self.store, self.role.pusher)
        if live.joined_late(self.ctx):  # a replacement: the servers hold the run's state
            live.settle_clock(self, live.resize_servers(self), joining=True)
        else:
            self._initialize_servers(None)

    def _server_setup(self) -> ServerSetup:
        num_pushers = (
            self.ctx.num_nodes if self.role.node_group is not None else self.ctx.world_size
        )
        return ServerSetup(
            mode=self.config.mode,
            staleness=self.config.staleness,
            num_pushers=num_pushers,
            world_size=self.ctx.world_size,
            build_optimizer=self.plan.build_optimizer,
            build_scheduler=self.plan.build_scheduler,
            timeout_s=live.server_wait_s(self.ctx, SERVER_WAIT_S),
            row_tables=dict(self.row_tables),
            num_shards=self.store.num_servers,
        )

    def _initialize_servers(self, state: dict[str, Any] | None) -> None:
        """Rank 0 (re)starts every shard from the model (and `state`); the others wait."""
        self._barrier()
        if self.ctx.rank == 0:
            setup = self._server_setup()
            arrays = [p.detach().cpu() for p in self.params]
            for shard, dense in enumerate(self.layout):
                indices = dense + list(self.row_tables)
                parts = [
                    row_part(arrays[g], shard, setup.num_shards)
                    if g in self.row_tables
                    else arrays[g]
                    for g in indices
                ]
                self.store.initialize(
                    shard, setup, indices, [a.numpy() for a in parts], state, self.clock
                )
        self._barrier()
        self.last = None

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    # --- training -----------------------------------------------------------------------------

    def _ensure_params(self) -> None:
        """Load the parameters of the current step into the model (pull if none in flight)."""
        assert self.client is not None
        if self.rows is not None:
            self.rows.step = self.clock  # the step whose rows the next lookups pull
        if self.last is not None and self.client.pull_future is None:
            return
        if self.client.pull_future is None:
            self.client.start_pull(self.clock)
        pulled = self.client.wait_pull()
        assert pulled is not None
        self.client.load(pulled.flat)
        self.loaded_clock = self.clock
        if pulled.ahead is not None:
            self.ahead.append(pulled.ahead)
        self.last = pulled

    def forward_backward(
        self, batch: dict[str, Tensor], *, loss_scale: float, sync: bool
    ) -> Tensor:
        """Forward and backward one micro-batch; the `sync` one pushes its gradient buckets."""
        self._ensure_params()
        if sync:
            self.client.begin(self.clock)
        try:
            loss = super().forward_backward(batch, loss_scale=loss_scale, sync=sync)
        finally:
            if sync:
                self.client.flush()
        if sync and self.rows is not None:
            self.rows.push(self.clock)
        return loss

    def sync_parameters(self) -> None:
        """Load the servers' parameters of the latest step (another optimizer's turn reads them)."""
        if self.client is not None:  # set up
            self._ensure_params()

    def _maybe_straggle(self) -> None:
        """Straggler injection: the configured rank's steps take `factor` times as long.

        A step's own time runs from the end of the previous step (data loading, the wait for
        its parameters, forward, backward and the pushes), so the worker is slowed as a whole,
        not only its arithmetic. The first step after an evaluation is not slowed.
        """
        slow = self.config.slow_worker
        if slow is None or slow.rank != self.ctx.rank or slow.factor <= 1:
            return
        now = time.perf_counter()
        if self.step_started is not None:
            time.sleep((now - self.step_started) * (slow.factor - 1))
        self.step_started = time.perf_counter()

    @torch.no_grad()
    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Model outputs for evaluation, without gradients (the latest pulled parameters)."""
        self._ensure_params()
        self.step_started = None  # evaluation time is not a step's
        return super().forward(batch)

    def optimizer_step(self, *, need_grad_norm: bool) -> StepStats:
        """Finish the step's pushes, load the parameters the servers computed, report staleness."""
        self._maybe_straggle()
        self._advance()
        if not need_grad_norm:
            lr = self.last.lr if self.last is not None else None
            return StepStats(grad_norm=None, lr=lr if lr is not None else float("nan"))
        self._ensure_params()  # wait for the servers' report of this step's update
        pulled = self.last
        stats = StepStats(grad_norm=pulled.grad_norm, lr=pulled.lr or 0.0)
        stats.extra.update(self._staleness_metrics())
        stats.extra.update(self._row_metrics())
        return stats

    def _advance(self) -> None:
        """This step's gradients were pushed; prefetch the next step's parameters."""
        self.clock += 1
        self.client.start_pull(self.clock)

    def _staleness_metrics(self) -> dict[str, float]:
        """Steps this worker was ahead of the slowest worker at its pulls, since the last log."""
        values, self.ahead = self.ahead, []
        if not values or self.config.mode == "sync":
            return {}
        return {
            "train/ps_staleness_mean": float(np.mean(values)),
            "train/ps_staleness_max": float(max(values)),
        }

    def _row_metrics(self) -> dict[str, float]:
        """Row-table bytes (ids and values) this worker pushed and pulled per step since the
        last log (`train/ps_row_bytes_per_step`); none without row tables."""
        if self.rows is None:
            return {}
        traffic = self.rows.traffic
        total = traffic.pushed + traffic.pulled
        steps = max(1, self.clock - self.logged[0])
        per_step = (total - self.logged[1]) / steps
        self.logged = (self.clock, total)
        return {"train/ps_row_bytes_per_step": float(per_step)}

    def zero_grad(self) -> None:
        # The gradients already reached the servers, which skip a non-finite update; the step
        # still counts (every pusher's clock moves on), so the next pull is for the next step.
        """Drop local gradients; the servers skip the non-finite update and the clock moves on."""
        if self.client is None:
            return  # closed by live recovery: the step is redone (`live.regroup` drops grads)
        self._advance()
        self._ensure_params()

    def all_true(self, flag: bool) -> bool:
        """True only if `flag` is true on every rank."""
        if not self.distributed or self.config.mode != "sync":
            return flag  # async/ssp workers never wait for each other here
        if self.ctx.rendezvous is not None:  # live: a passed vote means every push was sent
            self.client.wait_pushes()
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.ctx.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def sum_over_replicas(self, value: float) -> float | None:
        """sync: the sum over the workers; async/ssp: None (no common step to count)."""
        return super().sum_over_replicas(value) if self.config.mode == "sync" else None

    def reduce_metrics(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """Sum each metric over every rank."""
        if not self.distributed:
            return super().reduce_metrics(sums)
        return all_reduce_metrics(sums, self.ctx)

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Consolidated: every parameter, its optimizer state and the schedule (rank 0 asks)."""
        self._ensure_params()  # sync: the servers finished this step
        model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.ctx.rank != 0:
            return {"model": model}
        server = consolidate_states(self.store.state_dicts(self._state_shards()))
        names = {id(p): n for n, p in self.model.named_parameters()}
        for g, p in enumerate(self.params):
            model[names[id(p)]] = server["params"][g].view_as(p).clone()
        del server["params"]
        return {"model": model, "ps": {**server, "clock": self.clock}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint; rank 0 re-initializes every shard from it before anyone pulls."""
        self.model.load_state_dict(state["model"])
        if self.client is not None:
            self.client.wait_pull()
        ps = state.get("ps")
        if ps is None:
            raise KeyError("checkpoint has no parameter-server state ('ps')")
        self.clock = int(ps["clock"])
        self._initialize_servers(ps)

    def model_state_dict(self) -> dict[str, Tensor]:
        """The model's weights (the parameters last pulled from the servers, tables whole)."""
        self._ensure_params()
        if self.rows is not None:
            self.rows.pull_all()
        return self.model.state_dict()

    def _state_shards(self) -> list[int]:
        """The shards holding state: those with dense parameters, or all with row tables."""
        return list(range(self.store.num_servers)) if self.rows else used_shards(self.layout)

    def row_traffic(self) -> tuple[int, int] | None:
        """Bytes of row-table ids and values this worker pushed and pulled (None: no tables)."""
        if self.rows is None:
            return None
        return self.rows.traffic.pushed, self.rows.traffic.pulled

    def data_claimer(self) -> Callable[[int, int, int], int] | None:
        """With `data_assignment: dynamic`, the servers' shared chunk counter; else None."""
        return self._claim if self.dynamic else None

    def _claim(self, epoch: int, first: int, limit: int) -> int:
        """The next chunk of the epoch's data; out of data, this worker is idle for the servers
        (ssp no longer waits for it) until it claims again."""
        chunk = self.store.claim(epoch, first, limit)
        if (chunk < 0) != self.idle:
            self.idle = chunk < 0
            self.store.set_idle(self.ctx.rank, self.idle)
        return chunk

    def regroup(self, ctx: WorkerContext, *, joining: bool = False) -> None:
        """The workers re-formed: new pusher id, servers resized to the live workers."""
        self.close()  # (live recovery closed it already: the closed client is `retired`)
        self.ctx, self.distributed = ctx, ctx.world_size > 1
        self.store = build_store(self.config, ctx)  # a fresh one: no replies owed from before
        self.role = build_role(self.config, ctx)
        live.regroup(self, self.retired, BUCKET_MB, joining=joining)

    def close(self) -> None:
        # No waiting for a pull still in flight: after a failure it may wait for a worker or a
        # server that is gone, and the error that matters was already raised.
        """Stop the client (hooks, its thread); a pull in flight is abandoned."""
        if self.client is not None:
            self.client.close()
            self.retired, self.client = self.client, None
        if self.rows is not None:
            self.rows.close()


def build_store(config: PSStrategyConfig, ctx: WorkerContext) -> ParameterStore:
    """The servers the cluster started (`ctx.services`), a store attached locally, or an
    in-process one for a single worker."""
    service = ctx.services.get(SERVICE)
    if isinstance(service, ServiceGroup):
        return RemoteParameterStore(service)
    if service is not None:
        return service
    if ctx.world_size > 1:
        raise TrainingError(
            f"strategy.kind=ps with {ctx.world_size} workers needs parameter servers, "
            "but the worker context has none",
            "start the job through roundhouse (Ray), which starts the servers",
        )
    return LocalParameterStore(config.num_servers)


def build_role(
    config: PSStrategyConfig, ctx: WorkerContext, *, aggregate: bool = True
) -> PusherRole:
    """This rank's pusher: itself, or (node aggregation with >1 rank per node) its node.

    `aggregate=False` (a model with row tables): every rank pushes for itself.
    """
    if not (aggregate and config.node_aggregation) or ctx.world_size == ctx.num_nodes:
        return PusherRole(pusher=live.tag_of(ctx), is_leader=True, weight=1, leader_rank=ctx.rank)
    groups = build_node_groups(ctx.node_rank, ctx.local_rank)  # collective on every rank
    size = dist.get_world_size(groups.node)
    return PusherRole(
        pusher=ctx.node_rank,
        is_leader=dist.get_rank() == groups.leader,
        weight=size,
        node_group=groups.node,
        leader_rank=groups.leader,
    )


def all_reduce_metrics(sums: dict[str, Tensor], ctx: WorkerContext) -> dict[str, float]:
    """Sum metric tensors over every rank (ranks with no evaluation share included)."""
    keys: list[list[str] | None] = [None] * ctx.world_size
    dist.all_gather_object(keys, sorted(sums))
    names = sorted({k for ks in keys for k in ks or []})
    zero = torch.zeros((), dtype=torch.float64)
    values = torch.stack([sums.get(k, zero).double().cpu() for k in names]).to(ctx.device)
    dist.all_reduce(values)
    return dict(zip(names, values.cpu().tolist(), strict=True))
