"""`ElasticGroup`: a default process group that the survivors of a lost worker re-form.

Every generation `n` of the group lives under the key prefix `gen<n>/` of one shared store (a
`TCPStore` that outlives any worker: the driver's, or a test's). Generation 0 is the launch.
When a collective fails because a peer died, each survivor destroys its process group and calls
`reform()`:

1. it announces itself under `gen<n+1>/member/<id>` (`id` is its rank at launch, a stable
   name) and counts itself in `gen<n+1>/arrived`;
2. the first to arrive coordinates (`settle`): it waits until every member of the old
   generation arrived or is known lost, or the settle time passed since it arrived (at least
   `settle_s`; the loop passes about two steps' time, as a survivor deep in a step notices the
   loss only at its next collective), then writes the sorted list of arrived ids to
   `gen<n+1>/members`. A member is known lost when the driver says so (`mark_lost`: its actor
   died) or when its heartbeat stopped: every member's `Heartbeat` thread counts
   `beat/<id>` up every `BEAT_S`, and a count that stands still for `STALE_S` is a dead (or
   frozen) process. Each member's heartbeat thread also reads the others' counts as it beats
   (`Heartbeat.watch`), so when a survivor notices the loss (`observe`), it already knows
   how long a dead member's count has stood still: one killed during the others' step is
   known lost at once, not `STALE_S` after the loss was noticed. Sooner still, a member
   whose count has not moved is probed: its heartbeat listens on a TCP port (`pulse/<id>` in
   the store), and a refused connection means its process is gone (the kernel closed the
   socket when it died), while its host is up. A frozen process, or a host that is gone,
   does not refuse, and is known by its count alone. So the survivors wait for each other,
   not for the dead (`parallel/liveness.py`);
3. everyone reads that list (a blocking `get`), takes its index as its new rank, and joins
   `init_process_group` on `PrefixStore("gen<n+1>", store)` at the new world size.

A member that arrives after the list was written is not in it and raises `LeftBehind`. gloo
notices a dead peer's closed connection at once, so survivors arrive within milliseconds of
each other; a stalled (not dead) peer is noticed after the group's collective timeout.

Joining: a replacement worker calls `join()`: it takes a slot (`join/count`, then
`join/slot/<k>` = its id) and blocks until it is admitted. Rank 0 polls for waiting joiners
(`waiting_joiners`; the admitted ones are counted in the store, so whichever worker is rank 0
knows them); at a step boundary the members agree to admit them and call `advance()`:
rank 0 writes the next generation's members (the current ones, then the joiners) and tells
each joiner its generation in `join/<id>/gen`; everyone then forms that generation. Before
`init_process_group` (which would wait the whole collective timeout for a worker that never
connects), each says it is there and waits for the others (`await_generation`); a worker
known lost meanwhile (a replacement killed during its admission: the driver's mark, or its
heartbeat, which a waiting replacement runs too) raises `GenerationLost`: the members re-form
without it (a replacement back in the queue is not waited for) and a surviving replacement
waits to be admitted again.

Stranded joiners: if the last training member dies while others wait to join, nobody is left
to admit them. The driver, which knows which workers are alive, calls `rescue_stranded`: a
waiting worker that holds a committed state (a survivor left behind; each joiner tells the
step it holds in `join/<id>/holds`) leads a new generation of the waiting workers; when all
of them are fresh replacements the driver restarts from the newest checkpoint instead.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from roundhouse.errors import TrainingError
from roundhouse.parallel.liveness import Heartbeat, Vitals

logger = logging.getLogger(__name__)

SETTLE_S = 0.2  # the least time a coordinator waits for survivors beyond the first
POLL_S = 0.005
JOIN_WAIT_POLL_S = 0.05  # how often a waiting joiner looks for its admission


class LeftBehind(TrainingError):
    """This worker reached a new generation after it had formed without it."""


class GenerationLost(RuntimeError):
    """A worker of a join generation was lost before the generation formed (its process died
    between its admission and its connection): the others re-form without it."""


@dataclass
class ElasticGroup:
    """One worker's handle on the re-formable default process group.

    Args:
        store: the shared store (outlives every worker).
        member_id: this worker's stable name (its rank at launch).
        members: the ids of generation 0, in rank order.
        timeout_s: the process groups' collective timeout.
        settle_s: how long a coordinator waits for late survivors.
        host: the address the other workers reach this one at (its heartbeat's pulse port
            listens there).
    """

    store: dist.Store
    member_id: int
    members: list[int]
    timeout_s: float = 600.0
    settle_s: float = SETTLE_S
    host: str = "127.0.0.1"
    generation: int = 0
    reform_s: list[float] = field(default_factory=list)  # how long each re-forming took
    joined_late: bool = False  # this worker joined a running group (it needs the state)
    rescued: bool = False  # its last join formed a group of waiting workers (`rescue_stranded`)
    heartbeat: Heartbeat | None = field(default=None, repr=False)
    vitals: Vitals | None = field(default=None, repr=False)  # read since the loss was noticed

    @property
    def rank(self) -> int:
        """This worker's rank in the current generation."""
        return self.members.index(self.member_id)

    @property
    def world_size(self) -> int:
        """Workers in the current generation."""
        return len(self.members)

    def init(self) -> None:
        """Join the current generation's default process group (gloo)."""
        self.start_heartbeat()
        prefixed = dist.PrefixStore(f"gen{self.generation}", self.store)
        dist.init_process_group(
            "gloo",
            store=prefixed,
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=self.timeout_s),
        )

    def start_heartbeat(self) -> None:
        """Start this worker's `Heartbeat` (once), its pulse port on `host`."""
        if self.heartbeat is None:
            self.heartbeat = Heartbeat(
                self.store, self.member_id, watch=self.others, host=self.host
            )

    def others(self) -> list[int]:
        """The current generation's members other than this worker."""
        return [m for m in self.members if m != self.member_id]

    def observe(self) -> None:
        """Watch the other members' heartbeats from now, the moment this worker noticed a
        loss, starting from what its heartbeat thread saw of them (`Heartbeat.watch`): if it
        coordinates the re-form, a member dead since before the loss was noticed is known
        lost as soon as its count has stood still `STALE_S` in all, drain included."""
        seen = self.heartbeat.seen() if self.heartbeat is not None else {}
        self.vitals = Vitals(self.store, seen)
        for member in self.others():
            self.vitals.lost(member)

    def reform(self, settle_s: float | None = None) -> None:
        """Leave the broken group and form the next generation with whoever is alive.

        Args:
            settle_s: how long the coordinator waits for the other survivors (default: the
                group's `settle_s`). A survivor busy in a long step notices the loss only at
                its next collective, so the caller passes about two steps' time.
        """
        started = time.perf_counter()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.generation += 1
        key = f"gen{self.generation}"
        self.store.set(f"{key}/member/{self.member_id}", "1")
        vitals, self.vitals = self.vitals, None
        if self.store.add(f"{key}/arrived", 1) == 1:
            self._coordinate(key, max(self.settle_s, settle_s or 0.0), vitals)
        members = json.loads(self.store.get(f"{key}/members"))
        if self.member_id not in members:
            raise LeftBehind(
                f"worker {self.member_id} reached generation {self.generation} after it formed",
                "the survivors train on without it; a replacement joins as a new worker",
            )
        self.members = members
        self.init()
        self.reform_s.append(time.perf_counter() - started)
        logger.warning(
            "re-formed generation %d: %d workers (rank %d) in %.3f s",
            self.generation,
            self.world_size,
            self.rank,
            self.reform_s[-1],
        )

    def join(self, holds_step: int = -1) -> None:
        """As a replacement (or a survivor left behind): wait to be admitted at a step
        boundary, then join that generation.

        Args:
            holds_step: the committed step whose state this worker holds (a survivor left
                behind), or -1 (a fresh replacement). If every worker still alive ends up
                waiting here, the driver forms a group of them (`rescue_stranded`) led by the
                one holding the newest state; `rescued` then says so.
        """
        self.start_heartbeat()  # a waiting worker beats too: the members can tell it died
        while True:
            self.store.delete_key(f"join/{self.member_id}/gen")  # from an earlier admission
            self.store.set(f"join/{self.member_id}/holds", str(holds_step))
            slot = self.store.add("join/count", 1)
            self.store.set(f"join/slot/{slot}", str(self.member_id))
            self.store.set(f"join/{self.member_id}/waiting", "1")
            self.generation = self._admission()
            self.store.delete_key(f"join/{self.member_id}/waiting")
            self.members = json.loads(self.store.get(f"gen{self.generation}/members"))
            self.rescued = self.store.check([f"gen{self.generation}/rescue"])
            try:
                await_generation(self.store, f"gen{self.generation}", self.members,
                                 self.member_id, self.timeout_s)  # fmt: skip
                break
            except GenerationLost as exc:  # another worker admitted with it died: wait again
                logger.warning("%s: waiting to be admitted again", exc)
        self.joined_late = True
        self.init()
        logger.warning(
            "joined generation %d as rank %d of %d%s",
            self.generation,
            self.rank,
            self.world_size,
            " (a group of waiting workers: no member was left to admit them)"
            if self.rescued
            else "",
        )

    def _admission(self) -> int:
        """Wait (at most the collective timeout) for this worker's admission; its generation."""
        key = f"join/{self.member_id}/gen"
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check([key]):
            if time.monotonic() > deadline:
                raise TrainingError(
                    f"worker {self.member_id} waited {self.timeout_s:g} s to join the running "
                    "group and was not admitted",
                    "raise cluster.collective_timeout_s if the members' steps are that long",
                )
            time.sleep(JOIN_WAIT_POLL_S)
        return int(self.store.get(key))

    def waiting_joiners(self) -> list[int]:
        """Rank 0: the ids of replacements waiting to join (cheap: one store round trip)."""
        count = self.store.add("join/count", 0)
        # Admitted slots are counted in the store: a new rank 0 (the old one lost) knows them.
        admitted = self.store.add("join/admitted", 0)
        return [int(self.store.get(f"join/slot/{k}")) for k in range(admitted + 1, count + 1)]

    def advance(self, joiners: list[int]) -> None:
        """Form the next generation with `joiners` added (every member calls it; rank 0's
        `joiners` are the ones admitted, the others' are ignored)."""
        started = time.perf_counter()
        coordinator = self.rank == 0
        if dist.is_initialized():
            dist.destroy_process_group()
        self.generation += 1
        key = f"gen{self.generation}"
        if coordinator:
            self.store.add("join/admitted", len(joiners))
            self.store.set(f"{key}/members", json.dumps(self.members + joiners))
            for joiner in joiners:
                self.store.set(f"join/{joiner}/gen", str(self.generation))
        self.members = json.loads(self.store.get(f"{key}/members"))
        await_generation(self.store, key, self.members, self.member_id, self.timeout_s)
        self.init()
        self.reform_s.append(time.perf_counter() - started)
        logger.warning("generation %d: %d workers after a join", self.generation, self.world_size)

    def close(self) -> None:
        """Stop this worker's heartbeat (the run is over for it)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def _coordinate(self, key: str, settle_s: float, vitals: Vitals | None) -> None:
        members = settle(self.store, key, self.members, settle_s, vitals)
        self.store.set(f"{key}/members", json.dumps(members))


def settle(
    store: dist.Store,
    key: str,
    members: list[int],
    settle_s: float,
    vitals: Vitals | None = None,
) -> list[int]:
    """The coordinator's wait: the old `members` that arrived in generation `key`, once each
    of the others is known lost (`vitals`, which may have been watching since the loss was
    noticed: `ElasticGroup.observe`) or `settle_s` passed."""
    vitals = vitals if vitals is not None else Vitals(store)
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        if store.add(f"{key}/arrived", 0) >= len(members):
            break
        missing = [m for m in members if not store.check([f"{key}/member/{m}"])]
        # a replacement whose generation did not form waits to be admitted again: not coming
        gone = [vitals.lost(m) or waits_unadmitted(store, m) for m in missing]
        if all(gone):  # a list: every one's count is read
            break
        time.sleep(POLL_S)
    return [m for m in members if store.check([f"{key}/member/{m}"])]


def await_generation(
    store: dist.Store, key: str, members: list[int], me: int, timeout_s: float
) -> None:
    """Before a join generation's `init_process_group`: say this worker is here, and wait
    until every one of `members` is.

    `init_process_group` would wait the whole collective timeout for a worker that died
    between its admission and its connection (a replacement killed while it is admitted).
    Here a worker known lost (`Vitals`: the driver's mark or a heartbeat that stopped; a
    waiting replacement beats too) ends the wait at once.

    Raises:
        GenerationLost: a member of the generation is lost, or not all came in `timeout_s`.
    """
    store.set(f"{key}/ready/{me}", "1")
    vitals = Vitals(store)
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [m for m in members if not store.check([f"{key}/ready/{m}"])]
        if not missing:
            return
        lost = [m for m in missing if vitals.lost(m)]
        if lost or time.monotonic() > deadline:
            what = f"worker {lost[0]} was lost" if lost else f"workers {missing} did not come"
            raise GenerationLost(f"{what} before generation {key} formed")
        time.sleep(POLL_S)


def rescue_stranded(store: dist.Store, alive: list[int]) -> list[int] | None:
    """The driver's side of a loss: if every worker still `alive` waits to join, nobody is
    left to admit them; form a group of them.

    A waiting worker that holds a committed state (a survivor left behind) leads it: the
    members are ordered by the step they hold, newest first, so rank 0 hands its state to the
    rest (`LiveRecovery.join_running`). The group takes the first unused generation.

    Args:
        store: the shared store.
        alive: the member ids of every worker still alive (the driver knows them).

    Returns:
        None when some alive worker is still training (or none is alive): nothing to do.
        [] when the waiting workers are all fresh replacements: nobody holds the run's state,
        so the caller restarts from the newest checkpoint. Otherwise the new group's members.
    """
    if not alive or not all(waits_unadmitted(store, m) for m in alive):
        return None
    holds = {m: int(store.get(f"join/{m}/holds")) for m in alive}
    if max(holds.values()) < 0:
        return []
    members = sorted(alive, key=lambda m: (-holds[m], m))
    generation = 1
    while store.check([f"gen{generation}/members"]):
        generation += 1
    key = f"gen{generation}"
    store.set(f"{key}/rescue", "1")
    store.set(f"{key}/members", json.dumps(members))
    store.add("join/admitted", store.add("join/count", 0) - store.add("join/admitted", 0))
    for member in members:
        store.set(f"join/{member}/gen", str(generation))
    logger.warning(
        "no training worker is left: workers %s (waiting to join) form generation %d from "
        "worker %d's state (step %d)",
        members,
        generation,
        members[0],
        holds[members[0]],
    )
    return members


def waits_unadmitted(store: dist.Store, member: int) -> bool:
    """Whether `member` waits in `join` and no generation has admitted it yet."""
    return store.check([f"join/{member}/waiting"]) and not admitted(store, member)


def admitted(store: dist.Store, member: int) -> bool:
    """Whether a generation admitted the replacement `member` (or formed with it)."""
    return store.check([f"join/{member}/gen"])
