"""roundhouse's own worker group for `cluster.recovery: live`: Ray core actors, not Ray Train.

Ray Train tears the whole group down when one worker dies; live recovery needs the survivors
to keep their processes. So for `recovery: live` the driver:

1. holds the rendezvous store itself (a `TCPStore` in the driver process, which outlives any
   worker) on this node's address, and starts the strategy's services (the ps shard servers,
   which keep the parameters while workers come and go);
2. gathers one `LiveWorker` actor per worker: warm ones left by an earlier run when
   `cluster.keep_warm_s > 0` (`actor_pool`), fresh ones for the rest (`live_placement`);
3. runs `trainer.run_worker` on every actor with an `ElasticGroup` on that store, so the
   survivors of a lost worker re-form and go on (`roundhouse.trainer.live_recovery`);
4. polls the actors: a worker that dies (its actor is gone) is logged and not waited
   for; a worker that raises ends the run with its error. The run succeeds when every
   survivor finishes; its actors then go back to the pool (or end).

Each actor trains in a thread and keeps its main thread for the driver's calls; SIGTERM to a
worker reaches the loop through the main thread's forwarder (`live_worker`). SIGTERM to the
driver is handed on to every worker; a driver in a thread (a sweep's trial) hands it on
after `preempt_relay.preempt_drivers()`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from roundhouse.cluster.actor_pool import CLAIM_TIMEOUT_S, new_token
from roundhouse.cluster.capacity import wait_for_capacity, worker_resources
from roundhouse.cluster.live_placement import Placement, build_placement
from roundhouse.cluster.preempt_relay import drivers_preempted
from roundhouse.cluster.progress import RunMonitor
from roundhouse.cluster.runtime import ClusterError
from roundhouse.cluster.services import CONFIG_KEY as SERVICES_CONFIG_KEY
from roundhouse.cluster.services import services_stopped_at_exit, start_services
from roundhouse.config import JobSpec
from roundhouse.errors import RoundhouseError
from roundhouse.parallel.net import free_port
from roundhouse.runs.ledger import LEDGER, mark_resume
from roundhouse.runs.metrics_file import read_final_metrics
from roundhouse.weights.checkpoint import Checkpointer
from roundhouse.weights.run_folder import PreparedRun

logger = logging.getLogger(__name__)


def train_live_on_ray(
    prepared: PreparedRun,
    *,
    resume: bool,
    env: dict[str, str],
    runtime_env: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Run the job on `cluster.num_workers` live actors; return rank 0's final metrics.

    `env` is set in every worker before anything reads it (`workers.worker_env`);
    `runtime_env` is the actors' Ray runtime environment (`workers.worker_runtime_env`).
    If the group loses every worker that holds the run's state (`GroupLost`), it starts again
    from the newest checkpoint, as `recovery: restart` would, while the failure budget lasts.
    """
    job, cluster = prepared.job, prepared.job.cluster
    wait_for_capacity(cluster)
    placement = build_placement(job, runtime_env)
    config = {"job": job.model_dump(mode="json"), "env": env, "resume": resume,
              "resume_step": prepared.resume_step}  # fmt: skip
    failures = 0
    try:
        with RunMonitor(job, prepared.run_dir, time.time()):
            while True:
                try:
                    run_group(job, placement, config, failures)
                    break
                except GroupLost as exc:
                    failures = exc.failures
                    config.update(restart_point(prepared, exc))
    finally:
        placement.close()
    return read_final_metrics(prepared.run_dir)


def run_group(job: JobSpec, placement: Placement, config: dict[str, Any], failures: int) -> None:
    """One attempt: a store, the actors and the strategy's services; train until done.

    Raises:
        GroupLost: every worker that held the run's state was lost (`LiveWorkers.run`).
    """
    import ray
    import torch.distributed as dist

    host = ray.util.get_node_ip_address()
    port = free_port()
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False)
    workers = LiveWorkers(placement, job.cluster, (host, port), store=store)
    workers.replacements = failures
    finished = False
    try:
        workers.gather()
        services = start_services(job)  # ps: the shard servers (outlive every worker)
        workers.config = {**config, SERVICES_CONFIG_KEY: services}
        with services_stopped_at_exit(services), workers.sigterm_handed_on():
            workers.run()
        finished = True
    finally:
        workers.close(reuse=finished)
        del store


class GroupLost(ClusterError):
    """Every worker that held the run's state is gone; the ones left wait to join, fresh.

    Args:
        failures: the failure budget spent so far (losses and restarts).
    """

    def __init__(self, failures: int) -> None:
        super().__init__(
            "every worker holding the live group's training state was lost",
            "raise cluster.max_failures to let the group restart from the newest checkpoint",
        )
        self.failures = failures


def restart_point(prepared: PreparedRun, exc: GroupLost) -> dict[str, Any]:
    """The next attempt's resume settings: the newest checkpoint, or the job's own start."""
    latest = Checkpointer(prepared.run_dir, keep_last=1, identity={}).latest_step()
    where = f"checkpoint step {latest}" if latest is not None else "the start (no checkpoint)"
    logger.warning(
        "live recovery: no worker holding the training state is left (failure %d); "
        "restarting the group from %s, as recovery: restart would",
        exc.failures,
        where,
    )
    if latest is not None:
        return {"resume": True, "resume_step": latest}
    mark_ledger_restart(prepared)
    return {}


def mark_ledger_restart(prepared: PreparedRun) -> None:
    """A restart from the job's start: the lost attempt's ledger lines are void."""
    if prepared.job.trainer.ledger and prepared.run_dir.exists(LEDGER):
        mark_resume(prepared.run_dir, prepared.resume_step or 0)


class LiveWorkers:
    """The driver's view of the live group: gathers, starts, polls, replaces and returns the
    actors.

    `gather` claims warm actors (`actor_pool`) and starts fresh ones for the rest. `run`
    starts every member and polls them every `POLL_S` (which renews their claims). A lost
    actor (its process died) is replaced once per loss, at most
    `max(num_workers, max_failures)` times in a run, by a fresh actor that joins at the
    members' next step boundary. Once a worker finishes, the others get `FINISH_GRACE_S` to
    finish too; a replacement still waiting to join is stopped then, or at once when only
    such replacements are left (no member admits one after the last step). `close` returns the
    actors of a finished run to the pool (or ends them).
    """

    FINISH_GRACE_S = 60.0
    POLL_S = 0.2

    def __init__(
        self,
        placement: Placement,
        cluster: Any,
        store_addr: tuple[str, int],
        store: Any = None,
    ) -> None:
        self.placement, self.cluster, self.store_addr = placement, cluster, store_addr
        self.store = store  # the rendezvous store (the driver's), for `rescue`
        self.config: dict[str, Any] = {}
        self.token = new_token()
        self.ready: list[tuple[Any, int]] = []  # (actor, bundle) gathered for the members
        self.used: list[Any] = []  # every actor this run held
        self.active: dict[int, Any] = {}  # member id -> actor
        self.bundles: dict[int, int] = {}  # member id -> bundle
        self.replacements = 0  # the failure budget spent (losses; restarts before this group)
        self.lost = False  # a worker was lost: every poll looks for stranded joiners
        self.joining: set[int] = set()  # replacement members
        self.polls: dict[int, Any] = {}  # member -> its poll call in flight
        self.finished: list[int] = []
        self.sigterm = False  # the driver got SIGTERM; `preempt_sent`: the workers know
        self.preempt_sent = False

    def gather(self) -> None:
        """`num_workers` actors, warm ones first, every one up (or a `ClusterError`)."""
        world = self.cluster.num_workers
        warm = self.placement.claim(world, self.token)
        fresh = [self.placement.spawn(b, self.token) for b in range(len(warm), world)]
        self.used += warm + fresh
        self.ready = [(a, b) for b, a in enumerate(warm)]
        if warm:
            logger.info("reusing %d warm worker(s)", len(warm))
        self.ready += self.wait_ready(fresh, first_bundle=len(warm))

    def wait_ready(self, fresh: list[Any], first_bundle: int) -> list[tuple[Any, int]]:
        """Wait (at most `schedule_timeout_s`) for `fresh` actors to be up, keeping the claims
        of the warm ones and of the fresh ones already up (an actor whose claim goes
        unrenewed for `LEASE_S` ends itself, and one node may come up minutes before
        another); a warm actor that turns idle meanwhile takes a pending one's place."""
        import ray

        deadline = time.monotonic() + self.cluster.schedule_timeout_s
        pending = {actor.ready.remote(): actor for actor in fresh}
        while True:
            up, _ = ray.wait(list(pending), num_returns=len(pending), timeout=2.0)
            if len(up) == len(pending):
                ray.get(up)
                break
            if time.monotonic() > deadline:
                raise self.unschedulable()
            waiting_up = [actor for actor, _ in self.ready]
            if self.placement.pooled:  # a fresh pooled actor holds a lease from its start
                waiting_up += [pending[ref] for ref in up]
            ray.get([actor.renew.remote(self.token) for actor in waiting_up])  # keep the claims
            pending = self.swap_pending(pending, up)
        return [(a, first_bundle + i) for i, a in enumerate(pending.values())]

    def swap_pending(self, pending: dict[Any, Any], up: list[Any]) -> dict[Any, Any]:
        """Replace actors still waiting for resources by warm ones released since."""
        import ray

        waiting = [ref for ref in pending if ref not in up]
        warm = self.placement.claim(len(waiting), self.token)
        for ref, actor in zip(waiting, warm, strict=False):
            ray.kill(pending.pop(ref))
            pending[actor.ready.remote()] = actor
            self.used.append(actor)
        return pending

    def unschedulable(self) -> ClusterError:
        """The error for a group whose actors could not all be placed in time."""
        per_worker = worker_resources(self.cluster)
        return ClusterError(
            f"the live worker group ({self.cluster.num_workers} x {per_worker}) could not be "
            f"scheduled within cluster.schedule_timeout_s={self.cluster.schedule_timeout_s:g} s",
            "free or add resources, lower the request, or raise cluster.schedule_timeout_s",
        )

    def launch(self, actor: Any, member: int, bundle: int, joining: bool) -> None:
        """Start `actor` training as `member` (`joining` the running group)."""
        world = self.cluster.num_workers
        actor.start.remote(self.token, member, world, self.store_addr, self.config, joining)
        self.active[member], self.bundles[member] = actor, bundle

    def run(self) -> None:
        """Start every member and poll until the survivors finish (class docstring)."""
        for member, (actor, bundle) in enumerate(self.ready):
            self.launch(actor, member, bundle, joining=False)
        first_done = 0.0
        while self.active:
            if self.finished and (
                self.only_unadmitted_left() or time.monotonic() - first_done > self.FINISH_GRACE_S
            ):
                # the run is over; what still waits is a replacement never admitted
                logger.info("replacements %s not needed: the run is over", list(self.active))
                break
            time.sleep(self.POLL_S)
            if (self.sigterm or drivers_preempted()) and not self.preempt_sent:
                self.hand_on_sigterm()
            for member in self.poll_all():
                del self.active[member]
                first_done = first_done or time.monotonic()
                self.finished.append(member)
            if self.lost and not self.finished:
                self.rescue()
        if not self.finished:
            raise ClusterError("every worker of the live group was lost")

    def only_unadmitted_left(self) -> bool:
        """Whether every worker still active is a replacement no generation admitted. Once a
        member finished, the others finish at the same step and admit nobody after it, so
        such a replacement is not needed (without the store, `FINISH_GRACE_S` decides)."""
        if self.store is None:
            return False
        from roundhouse.parallel.rendezvous import admitted

        return all(m in self.joining and not admitted(self.store, m) for m in self.active)

    @contextlib.contextmanager
    def sigterm_handed_on(self) -> Iterator[None]:
        """While the group trains, SIGTERM to the driver preempts the workers (each writes
        its part of a complete checkpoint and stops, `trainer.preemption`)."""
        if threading.current_thread() is not threading.main_thread():
            yield  # a sweep's trial: its driver runs in a thread (`drivers_preempted`)
            return
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.sigterm = True

    def hand_on_sigterm(self) -> None:
        """Tell every active worker that the driver got SIGTERM (their errors, `Preempted`,
        come back through the next polls)."""
        logger.warning("SIGTERM: the workers checkpoint at the next step boundary and stop")
        self.preempt_sent = True
        for actor in self.active.values():
            actor.preempt.remote(self.token)

    def poll_all(self) -> list[int]:
        """Poll every active member (waiting at most `POLL_S` for the answers); return those
        that finished. A lost one is replaced; a failed one raises its error; one that has
        not answered yet (an actor still being placed) is asked again once it answers."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        for member, actor in self.active.items():
            if member not in self.polls:  # one poll in flight per member
                self.polls[member] = actor.poll.remote(self.token)
        calls = {m: call for m, call in self.polls.items() if m in self.active}
        answered, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=self.POLL_S)
        done = []
        for member, call in calls.items():
            if call not in answered:
                # A replacement whose node is not up yet (its actor is not created, so its
                # call waits): waiting on it would stop the others' polls, and with them the
                # renewals of their claims (`LEASE_S`). Its poll is collected when it answers.
                continue
            del self.polls[member]
            try:
                if ray.get(call) is not None:
                    done.append(member)
            except RayActorError:
                self.replace(member)
            except RayTaskError as exc:
                if not (self.finished and member in self.joining):
                    raise worker_error(exc) from exc
                # the run ended before this replacement was admitted: it gave up waiting
                logger.info("replacement worker %d was not needed: the run is over", member)
                del self.active[member]
        return done

    def rescue(self) -> None:
        """If every worker still alive waits to join (the last one training was lost), form
        a group of them led by one that holds the state (`rescue_stranded`).

        Raises:
            GroupLost: none of them holds the state: the run restarts from a checkpoint.
        """
        from roundhouse.parallel.rendezvous import rescue_stranded

        if self.store is None or rescue_stranded(self.store, sorted(self.active)) != []:
            return
        if self.replacements >= max_replacements(self.cluster):
            raise ClusterError(
                f"the live group lost every worker holding its state after {self.replacements} "
                f"failures (cluster.max_failures={self.cluster.max_failures})",
                "raise cluster.max_failures, or resume the run: --resume latest",
            )
        raise GroupLost(self.replacements + 1)

    def replace(self, member: int) -> None:
        """`member` was lost: the others go on; a fresh actor joins in its place."""
        logger.warning("worker %d was lost; the others go on without it", member)
        if self.store is not None:  # the survivors' coordinator stops waiting for it
            from roundhouse.parallel.liveness import mark_lost

            mark_lost(self.store, member)
        self.lost = True
        del self.active[member]
        bundle = self.bundles.pop(member)
        if self.replacements < max_replacements(self.cluster):
            self.replacements += 1
            actor = self.placement.spawn(bundle, self.token)
            self.used.append(actor)
            member = self.cluster.num_workers - 1 + self.replacements
            self.joining.add(member)
            self.launch(actor, member, bundle, True)

    def close(self, reuse: bool) -> None:
        """Return the actors to the pool after a finished run; end them otherwise."""
        import ray

        kept = 0
        for actor in self.used:
            if reuse and self.placement.pooled and self.release(actor):
                kept += 1
            else:
                ray.kill(actor)
        if kept:
            logger.info("%d warm worker(s) kept for cluster.keep_warm_s", kept)

    def release(self, actor: Any) -> bool:
        """Whether `actor` took the release (it is alive and its run is over)."""
        import ray

        try:
            return bool(ray.get(actor.release.remote(self.token), timeout=CLAIM_TIMEOUT_S))
        except Exception:
            return False


def max_replacements(cluster: Any) -> int:
    """How many lost actors a live run replaces: `cluster.max_failures`, at least
    `num_workers` (a long run on spot capacity loses far more workers than it has)."""
    return max(cluster.num_workers, cluster.max_failures)


def worker_error(exc: Exception) -> Exception:
    """The `RoundhouseError` a worker raised, if that is what failed; else one line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RoundhouseError):
        return cause
    text = str(exc).strip().splitlines()
    return ClusterError(f"a live worker failed: {text[-1] if text else type(exc).__name__}")
