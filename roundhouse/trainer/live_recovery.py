"""`cluster.recovery: live`: the survivors of a lost worker re-form and redo the step.

The loop runs each epoch (and its end) inside `LiveRecovery.guard`. When a collective fails
because a peer is gone (gloo raises at once on a closed connection; a stalled peer raises
after `cluster.collective_timeout_s`), every survivor:

1. keeps its own share's gradients of the step if its strategy copied them before the
   exchange (`Strategy.hold_gradient`), then drains its gradient thread and drops the step's
   partial gradients (the optimizer has not stepped: the step is uncommitted);
2. re-forms the process group with the other survivors (`ElasticGroup.reform`: a new
   generation of the shared store, a new world size, new ranks);
3. rebinds the strategy to the new group (`Strategy.regroup`);
4. agrees with the others on the last committed step: if a survivor committed a step that
   another did not (the peer died after the all-reduce reached some ranks only), the state
   of the one that is ahead is broadcast to the rest;
5. rebuilds its training loader for its new rank and world size at that step.

Training then goes on with the uncommitted step: the same global batch (the epoch order and
the batch arithmetic depend only on the seed, the epoch and the global batch size). If every
survivor kept its share (`take_over`), each restores those gradients and trains only its part
of the lost ranks' shares (`StepLoader.take_over`); else the whole batch is cut into one share
per survivor and redone. So data order, global batch and learning-rate schedule are unchanged
and no sample is dropped or repeated; the ledger (`trainer.ledger`) shows it.

Under `ps` the state lives on the servers: peers hand each other only the step counter
(`Strategy.peer_state_dict`) and the servers are resized (`roundhouse.parallel.ps.live`). If
the worker launched as rank 0 is lost, the lowest survivor becomes rank 0 and takes over the
run folder (`promote`): the store lives outside every worker.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from roundhouse.errors import JobFileError, TrainingError
from roundhouse.parallel.rendezvous import ElasticGroup, GenerationLost, LeftBehind
from roundhouse.parallel.timeouts import CollectiveTimeoutError
from roundhouse.runs.status import RUNNING, write_status
from roundhouse.runs.tracking import Tracker
from roundhouse.weights.checkpoint import deserialize, serialize

logger = logging.getLogger(__name__)

T = TypeVar("T")

JOIN_POLL_S = 1.0  # how often rank 0 looks for a waiting replacement
STEP_TIMES = 8  # the step time survivors wait on is the median of this many recent steps


class JoinPending(Exception):
    """The members agreed at this step boundary to admit waiting replacements."""


# What gloo says when a peer's process is gone (its sockets closed) or stopped answering.
PEER_LOSS_MARKERS = (
    "connection closed",
    "connection reset",
    "broken pipe",
    "connection refused",
    "timed out",
    "timeout",
    "socket",
)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another worker is gone or stalled."""
    if isinstance(exc, CollectiveTimeoutError | TimeoutError | GenerationLost):
        # TimeoutError: a ps pull waited the collective timeout (`ps/live.py`); GenerationLost:
        # a replacement died as it was admitted (`rendezvous.await_generation`)
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in PEER_LOSS_MARKERS)


def loss_reason(exc: BaseException) -> str:
    """A peer-loss error's first line, for the log."""
    return str(exc).splitlines()[0][:200]


@dataclasses.dataclass
class HeldShare:
    """What a survivor keeps of the step that failed: its own share's gradients
    (`Strategy.hold_gradient`), samples and loss items, and its rank in the failed step."""

    gradient: Any
    samples: list[int]
    items: float
    rank: int


class LiveRecovery:
    """The loop's side of live recovery (see the module docstring).

    Args:
        group: this worker's re-formable process group.
        build_loader: builds the training loader for a strategy's rank and world size.
    """

    def __init__(self, group: ElasticGroup, build_loader: Callable[[Any], Any]) -> None:
        self.group = group
        self.build_loader = build_loader
        self.mark: tuple[int, int] | None = None  # (committed steps, epoch step) at step start
        self.step_started: float | None = None
        # Recent steps' wall times (a step interrupted by a recovery or an admission is not
        # one): survivors wait about two steps for each other (`step_s`).
        self.step_times: collections.deque[float] = collections.deque(maxlen=STEP_TIMES)
        self.joiners: list[int] = []  # rank 0: replacements found waiting at the last poll
        self.next_poll = 0.0
        self.stalls_s: list[float] = []  # failure noticed -> group re-formed and state agreed
        self.failed_world = group.world_size  # the world size of the step that failed
        self.taken_over: int | None = None  # the step whose lost shares are being redone

    def begin_step(self, trainer: Any) -> None:
        """Note where the step about to run starts (the loader has just yielded it)."""
        now = time.perf_counter()
        if self.step_started is not None:
            self.step_times.append(now - self.step_started)
        self.mark, self.step_started = (trainer.state.step, trainer.train_loader.last_step), now

    @property
    def step_s(self) -> float:
        """The typical step's wall time here (0 before any was measured): the median of the
        recent ones, so one step that also saved a checkpoint or validated does not count."""
        return statistics.median(self.step_times) if self.step_times else 0.0

    def guard(self, trainer: Any, fn: Callable[[], T]) -> T:
        """Run `fn`; after each peer loss, recover and run it again from where it stopped.

        An admission or a recovery can itself lose a peer (a worker killed while the state
        is on its way to a replacement, or while the survivors agree): that is recovered from
        the same way, never the end of the run.
        """
        admit, reason = False, None
        while True:
            try:
                if admit:
                    admit = False
                    self.admit(trainer)
                elif reason is not None:
                    self.recover(trainer, reason)
                reason = None
                return fn()
            except JoinPending:
                admit = True
                continue
            except Exception as exc:
                if not is_peer_loss(exc):
                    raise
                reason = loss_reason(exc)
            # The recovery runs at the top of the loop, outside this `except`: the error's
            # frames hold the broken groups (see `recover`).

    def join_waiting(self) -> bool:
        """Rank 0, at most every `JOIN_POLL_S`: whether a replacement waits to join."""
        if self.group.rank != 0 or time.monotonic() < self.next_poll:
            return False
        self.next_poll = time.monotonic() + JOIN_POLL_S
        self.joiners = self.group.waiting_joiners()
        return bool(self.joiners)

    def admit(self, trainer: Any) -> None:
        """Every member: form the next generation with the waiting replacements and hand
        them the state (after the step just committed)."""
        position = {
            "epoch": trainer.state.epoch,
            "steps_done": trainer.train_loader.state_dict()["steps_done"],
        }
        trainer.strategy.close()
        self.group.advance(self.joiners)
        self.joiners = []
        self.step_started = None  # the next step waits for the admission: not a step time
        self.rebind(trainer, joining=True)
        self.send_state(trainer, 0, position)
        self.reload(trainer, position)

    def join_fresh(self, trainer: Any) -> None:
        """A replacement's first join (`join_running`). If a member is lost while the state
        is on its way, this worker, which holds nothing yet, waits to be admitted again."""
        while True:
            try:
                self.join_running(trainer)
                return
            except Exception as exc:
                if not is_peer_loss(exc) or self.group.rescued:
                    raise
                reason = loss_reason(exc)
            logger.warning("lost a peer while joining (%s): waiting to join again", reason)
            release_process_groups()
            self.group.join()
            self.rebind(trainer, joining=True)

    def join_running(self, trainer: Any, position: dict[str, int] | None = None) -> None:
        """A replacement, once built in its new generation: take the members' state.

        In a group of stranded joiners (`ElasticGroup.rescued`: the last training member died
        while they waited), rank 0 holds the newest committed state (a survivor left behind,
        which passes its `position`) and hands it to the others; the run goes on from its
        step and the ledger voids what the lost members trained after it.
        """
        rescued = self.group.rescued
        source = position if rescued and self.group.rank == 0 else None
        if rescued and self.group.rank == 0 and source is None:
            raise TrainingError(
                "a group of waiting workers formed without one that holds the run's state",
                "resume the run from its latest checkpoint (--resume latest)",
            )
        self.reload(trainer, self.send_state(trainer, 0, source))
        if rescued and trainer.ledger is not None:
            trainer.ledger.resumed(trainer.state.step)
        logger.warning("joined at step %d", trainer.state.step)

    def recover(self, trainer: Any, reason: str) -> None:
        """Re-form with the survivors and set the trainer up to redo the uncommitted step."""
        started = time.perf_counter()
        self.group.observe()  # a dead member's heartbeat stands still from here on
        logger.warning("lost a peer (%s): re-forming", reason)
        position = self.position(trainer)
        self.failed_world = trainer.strategy.data_parallel_size  # the lost step's world size
        held = self.hold(trainer)
        trainer.strategy.close()  # drain the gradient thread: its buckets fail fast now
        trainer.strategy.zero_grad()  # a partial, uncommitted step's gradients
        release_process_groups()
        was_main = trainer.ctx.is_main
        # The others wait about two steps for each other (one deep in a step notices the loss
        # only at its next collective), and at least twice what this worker took to drain and
        # collect its groups (a full collection: a few hundred ms), which they take too.
        prepared_s = time.perf_counter() - started
        try:
            self.group.reform(settle_s=2 * max(self.step_s, prepared_s))
        except LeftBehind as exc:  # the others re-formed without this worker: join them
            logger.warning("%s: joining the survivors as a replacement", exc)
            self.rejoin(trainer, was_main, position)
            return
        self.step_started = None  # the step being redone is not a measure of step time
        self.rebind(trainer, joining=False)
        position, lost = self.agree(trainer, position, held)
        self.reload(trainer, position)
        if held is not None and lost:
            self.take_over(trainer, held, lost, position)
        if trainer.ctx.is_main and not was_main:
            promote(trainer)
        if trainer.ledger is not None:
            if trainer.ctx.is_main:  # a share the lost worker exchanged but never recorded
                filled = trainer.ledger.record_unrecorded(trainer.state.step)
                if filled:
                    logger.warning(
                        "ledger: recorded %d samples of step %d for the lost worker",
                        filled,
                        trainer.state.step,
                    )
            trainer.ledger.resumed(trainer.state.step)
        self.stalls_s.append(time.perf_counter() - started)
        logger.warning(
            "live recovery: %d workers go on from step %d (epoch %d, step %d of the epoch)",
            trainer.ctx.world_size,
            trainer.state.step,
            position["epoch"],
            position["steps_done"],
        )

    def rejoin(self, trainer: Any, was_main: bool, position: dict[str, int]) -> None:
        """A survivor left behind (it noticed the loss after the others had re-formed, e.g.
        it waited on a peer that went on without it): it waits to be admitted at the members'
        next step boundary, like a replacement, and takes their state. If the members are
        all lost meanwhile, it leads the waiting workers from its own state (`join_running`)."""
        self.group.join(holds_step=trainer.state.step)
        self.step_started = None
        self.rebind(trainer, joining=True)
        self.join_running(trainer, position)
        if was_main and not trainer.ctx.is_main:
            demote(trainer)
        elif trainer.ctx.is_main and not was_main:
            promote(trainer)

    def rebind(self, trainer: Any, *, joining: bool) -> None:
        """The trainer's context and strategy on the group's current generation."""
        trainer.ctx = rebind_context(trainer.ctx, self.group)
        trainer.strategy.regroup(trainer.ctx, joining=joining)

    def reload(self, trainer: Any, position: dict[str, int]) -> None:
        """A training loader for the new rank and world size, at `position`."""
        trainer.train_loader = self.build_loader(trainer.strategy)
        trainer.train_loader.load_state_dict(position)
        if trainer.ledger is not None:
            trainer.ledger.rebind(trainer.ctx.rank, trainer.train_loader)
        trainer.strategy.train_mode(True)

    def position(self, trainer: Any) -> dict[str, int]:
        """The loader position of the first uncommitted step."""
        done = trainer.train_loader.state_dict()["steps_done"]
        if self.mark is not None and trainer.state.step == self.mark[0]:
            done = self.mark[1]  # the step that failed was yielded but never applied
        return {"epoch": trainer.state.epoch, "steps_done": done}

    def hold(self, trainer: Any) -> HeldShare | None:
        """As a loss is noticed: this rank's share of the uncommitted step, if its strategy
        kept the share's gradients (`Strategy.hold_gradient`). Not when the step that failed
        was itself a redo of lost shares (`take_over`): its gradients are not one share's."""
        trainer.held_items = 0.0
        step = trainer.state.step
        if self.mark is None or self.mark[0] != step or self.taken_over == step:
            return None
        gradient = trainer.strategy.hold_gradient()
        if gradient is None:
            return None
        samples = list(trainer.train_loader.last_indices)
        rank = trainer.strategy.data_parallel_rank
        return HeldShare(gradient, samples, trainer.step_items, rank)

    def take_over(
        self, trainer: Any, held: HeldShare, lost: list[int], position: dict[str, int]
    ) -> None:
        """Redo only the `lost` ranks' shares of the step: each survivor keeps its own share's
        gradients and trains its part of the rest (`StepLoader.take_over`)."""
        take_over = getattr(trainer.train_loader, "take_over", None)  # a streamed one has none
        step = position["steps_done"]
        if take_over is None or not take_over(step, lost, self.failed_world, held.samples):
            return  # the same answer on every survivor: each redoes the whole step
        trainer.strategy.restore_gradient(
            held.gradient, trainer.strategy.data_parallel_size / self.failed_world
        )
        trainer.held_items = held.items
        self.taken_over = trainer.state.step
        logger.warning(
            "keeping this worker's share of step %d: redoing only the share of rank(s) %s",
            trainer.state.step + 1,
            lost,
        )

    def agree(
        self, trainer: Any, position: dict[str, int], held: HeldShare | None = None
    ) -> tuple[dict[str, int], list[int]]:
        """Make every survivor hold the most advanced committed state; return its position,
        and the ranks of the failed step that are lost if every survivor holds its share of
        that step (`hold`; else an empty list: the whole step is redone).

        A survivor one step behind (its vote on the step failed, but the step was applied: by
        the others, or by the ps servers, `Strategy.live_lag`) had its share in that update,
        so its ledger records the step before it takes the state of one that is ahead; where
        no survivor is ahead (only the servers applied the step), each moves on by itself.
        """
        lag = trainer.strategy.live_lag()
        mine = (trainer.state.step, position["epoch"], position["steps_done"], lag)
        views: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(views, (*mine, None if held is None else held.rank))
        target = max(v[0] + v[3] for v in views)
        if all(tuple(v[:4]) == mine for v in views) and lag == 0:
            kept = {v[4] for v in views}
            whole = None not in kept  # every survivor holds its share of the step
            return position, sorted(set(range(self.failed_world)) - kept) if whole else []
        if trainer.state.step < target and trainer.ledger is not None:
            trainer.ledger.committed(
                epoch=trainer.state.epoch, global_step=target, world=self.failed_world
            )
        sources = [r for r, v in enumerate(views) if v[0] == target]
        if not sources:  # only the servers hold the step: every survivor counts it itself
            logger.warning("the servers had applied step %d: going on after it", target)
            trainer.state.step, trainer.state.step_epoch = target, trainer.state.epoch
            return {**position, "steps_done": position["steps_done"] + 1}, []
        logger.warning("taking step %d from rank %d (it had committed it)", target, sources[0])
        return self.send_state(trainer, sources[0], position), []

    def send_state(self, trainer: Any, src: int, position: dict[str, int] | None) -> dict[str, int]:
        """Broadcast rank `src`'s strategy state, loop state and data position; return it."""
        payload: list[Any] = [None]
        if dist.get_rank() == src:
            state = {
                "strategy": trainer.strategy.peer_state_dict(),
                "trainer": dataclasses.asdict(trainer.state),
                "data": position,
                "step_s": self.step_s,
            }
            payload = [serialize(state)]
        dist.broadcast_object_list(payload, src=src)
        if dist.get_rank() == src:
            assert position is not None
            return position
        state = deserialize(payload[0])
        trainer.strategy.load_peer_state_dict(state["strategy"])
        trainer.state = type(trainer.state)(**state["trainer"])
        if not self.step_times and state["step_s"] > 0:
            # a replacement measured no step yet: until it has, it waits on the sender's
            # (with none, it would wait only `SETTLE_S` for survivors in a long step, and
            # re-form without them)
            self.step_times.append(state["step_s"])
        return state["data"]


def release_process_groups() -> None:
    """Destroy every process group and collect every reference cycle.

    A peer blocked on this worker (a ring neighbour waiting for its chunk) notices the loss
    only when this worker's sockets close, when the last reference to the old groups goes
    (gloo's `abort()`/`shutdown()` close nothing). The failed collectives' tracebacks and the
    gradient thread's objects (reference cycles, some old enough for the oldest generation)
    keep them alive, so the collection is a full one (a few hundred ms in a big process):
    with only the young generations collected, the multi-node trace left a survivor blocked
    until `collective_timeout_s` (60 s), after which it rejoined as a replacement. Should
    something outside Python's collector still hold a group, that is what happens (`rejoin`).
    """
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def demote(trainer: Any) -> None:
    """This worker wrote the run folder as rank 0 but rejoined at another rank: it stops
    writing (the rank 0 of the survivors writes from now on)."""
    old, trainer.tracker = (
        trainer.tracker,
        Tracker(trainer.job, trainer.checkpointer.run_dir, is_main=False, resumed=True,
                resume_step=trainer.state.step, total_steps=trainer.total_steps),
    )  # fmt: skip
    old.close()


def promote(trainer: Any) -> None:
    """This survivor is the new rank 0 (the lowest surviving launch rank; the old one was
    lost): it takes over the run folder's metrics (rows the lost writer logged after the
    agreed step are dropped, as on a resume), W&B (the same run id) and status. Checkpoints,
    the ledger's resume points and the admission of replacements follow the rank by
    themselves."""
    run_dir = trainer.checkpointer.run_dir
    old, trainer.tracker = (
        trainer.tracker,
        Tracker(
            trainer.job,
            run_dir,
            is_main=True,
            resumed=True,
            resume_step=trainer.state.step,
            total_steps=trainer.total_steps,
        ),
    )
    old.close()
    write_status(run_dir, RUNNING, world_size=trainer.ctx.world_size)
    logger.warning(
        "this worker (rank 0 now) writes the run folder from step %d", trainer.state.step
    )


def check_live_recovery(job: Any, strategy_class: Any, *, local: bool) -> None:
    """`cluster.recovery: live` needs a strategy that can re-form its group, flat (the
    strategy's own `check_job` refuses what it cannot re-form, e.g. ps async/ssp).

    Raises:
        JobFileError: the strategy keeps the restart path (DeepSpeed, pipeline, single).
    """
    if job.cluster.recovery != "live" or local:
        return
    if not strategy_class.supports_live_recovery:
        raise JobFileError(
            f"cluster.recovery=live: strategy.kind={job.strategy.kind} cannot re-form its "
            "group with the survivors of a lost worker (only ring and ps can)",
            "set cluster.recovery=restart (a lost worker restarts the group from the latest "
            "checkpoint), or use strategy.kind=ring",
        )
    if getattr(job.strategy, "hierarchical", False):
        raise JobFileError(
            "cluster.recovery=live re-forms a flat ring, but strategy.hierarchical=true",
            "set strategy.hierarchical=false, or cluster.recovery=restart",
        )


def rebind_context(ctx: Any, group: ElasticGroup) -> Any:
    """`ctx` at the group's new rank and world size (each worker its own node), its layout
    (`Topology`) resized to the survivors: the same global batch over fewer ranks."""
    topology = ctx.topology
    if topology is not None:
        topology = dataclasses.replace(topology, world_size=group.world_size)
    return dataclasses.replace(
        ctx,
        topology=topology,
        rank=group.rank,
        world_size=group.world_size,
        local_rank=0,
        local_world_size=1,
        node_rank=group.rank,
        num_nodes=group.world_size,
    )
