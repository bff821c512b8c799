"""`ps` under `cluster.recovery: live`: the servers keep the parameters while workers come and go.

When a worker is lost (or a replacement joins), the workers re-form their process group
(`roundhouse.trainer.live_recovery`) and the `ps` strategy rebinds to it here:

1. every worker gets a pusher id of the new generation (`resize.pusher_tag`), so a push still
   on its way from before is ignored by the servers when it arrives;
2. rank 0 resizes every shard to the new pushers (`ShardServer.resize`): the pending,
   uncommitted step is dropped, a sync round now waits for the live workers only, and each
   shard reports how many steps it applied;
3. every worker learns the fewest steps any shard applied. A worker whose last step was in
   fact applied everywhere (the lost worker's last gradient arrived before it died, but the
   vote on the step failed) moves on by one step (`lag`); the loop's agreement then counts
   it as committed. Otherwise the workers redo the step with the lost worker's share of the
   global batch split among them, from the parameters they hold; a shard that had applied
   that step already (the lost worker's gradient reached it, not others) ignores the redo.

A replacement runs `setup` in its new generation: the same broadcast of the module and the
same resize as the members, never a re-initialization of the servers; it then pulls the
parameters of the members' step.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from roundhouse.errors import JobFileError, TrainingError
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.ps.client import PSClient
from roundhouse.parallel.ps.resize import pusher_tag
from roundhouse.parallel.ps.rows import RowTables
from roundhouse.parallel.ring.strategy import broadcast_module


def check_live_job(job: Any, world_size: int) -> None:
    """`cluster.recovery: live` re-forms ps in sync mode only: async/ssp workers never vote on
    a step together, so a lost one's step could not be redone; dynamic assignment has no fixed
    shares to re-cut.

    Raises:
        JobFileError: live recovery with a mode or data assignment it cannot re-form.
    """
    if job.cluster.recovery != "live" or world_size == 1:
        return
    if job.strategy.mode != "sync":
        raise JobFileError(
            f"cluster.recovery=live with strategy.kind=ps needs strategy.mode=sync, not "
            f"{job.strategy.mode} (async/ssp workers never agree on a step, so a lost "
            "worker's step could not be redone)",
            "set strategy.mode=sync, or cluster.recovery=restart",
        )
    if job.strategy.data_assignment == "dynamic":
        raise JobFileError(
            "cluster.recovery=live with strategy.kind=ps needs strategy.data_assignment=static "
            "(a lost worker's claimed batches cannot be re-cut among the survivors)",
            "set strategy.data_assignment=static, or cluster.recovery=restart",
        )


def generation_of(ctx: WorkerContext) -> int:
    """The live group's generation this worker is in (0 without live recovery)."""
    return getattr(ctx.rendezvous, "generation", 0) if ctx.rendezvous is not None else 0


def joined_late(ctx: WorkerContext) -> bool:
    """Whether this worker is a replacement joining a running live group."""
    return bool(getattr(ctx.rendezvous, "joined_late", False))


def server_wait_s(ctx: WorkerContext, default: float) -> float:
    """How long a pull may wait for the other workers: under live recovery the collective
    timeout (a worker lost right after its vote shows as a pull that times out, which live
    recovery treats as a lost peer); else `default`."""
    return float(ctx.rendezvous.timeout_s) if ctx.rendezvous is not None else default


def tag_of(ctx: WorkerContext) -> int:
    """This worker's pusher id in its current generation."""
    return pusher_tag(generation_of(ctx), ctx.rank)


def resize_servers(strategy: Any) -> int:
    """Collective: rank 0 points every shard at this generation's pushers; every rank gets
    the fewest steps any shard has applied."""
    ctx = strategy.ctx
    if strategy.distributed:
        dist.barrier()  # every worker has left the old generation (closed its client)
    applied: list[Any] = [None]
    if ctx.rank == 0:
        tags = [pusher_tag(generation_of(ctx), r) for r in range(ctx.world_size)]
        store = strategy.store
        applied = [min(store.resize(s, tags, ctx.world_size) for s in range(store.num_servers))]
    if strategy.distributed:
        dist.broadcast_object_list(applied, src=0)
    return int(applied[0])


def regroup(strategy: Any, old: PSClient, bucket_mb: float, *, joining: bool) -> None:
    """Finish rebinding `strategy` (closed; its client was `old`; its context, store and role
    already the new generation's) to the re-formed group (see the module docstring).

    `joining`: a replacement runs `setup` in this generation; match its broadcast.
    """
    for p in strategy.params:
        p.grad = None  # the uncommitted step's gradients: the step is redone
    if joining and strategy.distributed:
        broadcast_module(strategy.model)
    strategy.client = PSClient(
        old.params, strategy.store, old.layout, strategy.role, bucket_mb=bucket_mb, shards=old.used
    )
    if strategy.rows is not None:
        modules, indices = strategy.rows.modules, strategy.rows.indices
        strategy.rows = RowTables(modules, indices, strategy.store, strategy.role.pusher)
    settle_clock(strategy, resize_servers(strategy), joining=False)


def settle_clock(strategy: Any, applied: int, *, joining: bool) -> None:
    """After a resize: move this worker's clock to the servers' step where they are one ahead
    (`strategy.lag` says by how much); pull where the model does not hold that step's
    parameters. `joining`: a replacement, which takes the servers' step as its own."""
    lag = 0 if joining else applied - strategy.clock
    if lag not in (0, 1):
        raise TrainingError(
            f"ps live recovery: the servers applied {applied} steps but this worker is at "
            f"step {strategy.clock}",
            "continue with --resume latest",
        )
    strategy.lag = max(lag, 0)
    strategy.clock = max(strategy.clock, applied)
    if strategy.loaded_clock != strategy.clock:
        strategy.last = None  # the next forward pulls this step's parameters


class LiveServersMixin:
    """The `ps` strategy's live-recovery hooks (`Strategy.peer_state_dict` and friends)."""

    clock: int
    lag: int
    loaded_clock: int
    last: Any

    def live_lag(self) -> int:
        """Steps the servers applied beyond this worker's view at the last `regroup`."""
        return self.lag

    def peer_state_dict(self) -> dict[str, Any]:
        """What a live peer hands another: the clock (the servers hold everything else)."""
        return {"clock": self.clock}

    def load_peer_state_dict(self, state: dict[str, Any]) -> None:
        """Take a live peer's clock; pull that step's parameters unless the model holds them."""
        self.clock = int(state["clock"])
        if self.loaded_clock != self.clock:
            self.last = None
