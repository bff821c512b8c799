"""roundhouse's own worker group for `cluster.recovery: live`: Ray core actors, not Ray Train.

Ray Train tears the whole group down when one worker dies; live recovery needs the survivors
to keep their processes. So for `recovery: live` the driver:

1. holds the rendezvous store itself (a `TCPStore` in the driver process, which outlives any
   worker) on this node's address, and starts the strategy's services (the ps shard servers,
   which keep the parameters while workers come and go);
2. reserves one placement-group bundle per worker (`cluster.placement`) and starts one
   `LiveWorker` actor in each;
3. runs `trainer.run_worker` on every actor with an `ElasticGroup` on that store, so the
   survivors of a lost worker re-form and go on (`roundhouse.trainer.live_recovery`);
4. waits for the actors: a worker that dies (its actor is gone) is logged and not waited
   for; a worker that raises ends the run with its error. The run succeeds when every
   survivor finishes.

Sync actor methods run on the actor process's main thread, so SIGTERM to a worker reaches the
loop's preemption handler (`trainer.preemption`).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from typing import Any

from roundhouse.cluster.capacity import wait_for_capacity, worker_resources
from roundhouse.cluster.progress import RunMonitor
from roundhouse.cluster.quiet import configure_worker_logging
from roundhouse.cluster.runtime import ClusterError
from roundhouse.cluster.services import CONFIG_KEY as SERVICES_CONFIG_KEY
from roundhouse.cluster.services import attach_services, services_stopped_at_exit, start_services
from roundhouse.config import JobSpec
from roundhouse.errors import RoundhouseError
from roundhouse.parallel.net import free_port
from roundhouse.runs.metrics_file import read_final_metrics
from roundhouse.trainer import WorkerContext, run_worker
from roundhouse.weights.run_folder import PreparedRun

logger = logging.getLogger(__name__)

PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


class LiveWorker:
    """One worker process of the live group (a Ray actor; see the module docstring)."""

    def run(
        self,
        member: int,
        world: int,
        store_addr: tuple[str, int],
        config: dict,
        joining: bool = False,
    ) -> dict:
        """Join generation 0 as `member` of `world` (or, `joining`, the running group at its
        next step boundary) and train; return the final metrics."""
        import torch
        import torch.distributed as dist

        from roundhouse.parallel.rendezvous import ElasticGroup

        os.environ.update(config["env"])
        configure_worker_logging()
        job = JobSpec.model_validate(config["job"])
        torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))
        timeout = datetime.timedelta(seconds=job.cluster.collective_timeout_s)
        store = dist.TCPStore(*store_addr, is_master=False, timeout=timeout)
        group = ElasticGroup(
            store, member, list(range(world)), timeout_s=job.cluster.collective_timeout_s
        )
        group.join() if joining else group.init()
        rank, size = group.rank, group.world_size
        ctx = WorkerContext(
            rank=rank, world_size=size, node_rank=rank, num_nodes=size, rendezvous=group
        )
        ctx = attach_services(ctx, config)  # ps: the shard servers, which outlive any worker
        quiet = job.model_copy(deep=True)
        quiet.tracking.console = "off"  # the driver owns the console (RunMonitor)
        try:
            return run_worker(
                quiet, ctx, resume_step=config["resume_step"], resume=config["resume"]
            )
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def train_live_on_ray(
    prepared: PreparedRun, *, resume: bool, env: dict[str, str]
) -> dict[str, float]:
    """Run the job on `cluster.num_workers` live actors; return rank 0's final metrics.

    `env` is set in every worker before anything reads it (`workers.worker_env`).
    """
    import ray
    import torch.distributed as dist
    from ray.util.placement_group import placement_group, remove_placement_group

    job, cluster = prepared.job, prepared.job.cluster
    wait_for_capacity(cluster)
    host = ray.util.get_node_ip_address()
    port = free_port()
    store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False)
    bundles = [worker_resources(cluster) for _ in range(cluster.num_workers)]
    group = placement_group(bundles, strategy=PLACEMENT[cluster.placement])
    ready, _ = ray.wait([group.ready()], timeout=cluster.schedule_timeout_s)
    if not ready:
        remove_placement_group(group)
        raise ClusterError(
            f"the live worker group ({cluster.num_workers} x {bundles[0]}) could not be "
            f"scheduled within cluster.schedule_timeout_s={cluster.schedule_timeout_s:g} s",
            "free or add resources, lower the request, or raise cluster.schedule_timeout_s",
        )
    try:
        services = start_services(job)  # ps: the shard servers (outlive every worker)
    except BaseException:
        remove_placement_group(group)
        raise
    config = {
        "job": job.model_dump(mode="json"),
        "env": env,
        "resume": resume,
        "resume_step": prepared.resume_step,
        SERVICES_CONFIG_KEY: services,
    }
    workers = LiveWorkers(group, cluster, (host, port), config)
    try:
        with RunMonitor(job, prepared.run_dir, time.time()), services_stopped_at_exit(services):
            workers.run()
    finally:
        workers.kill()
        remove_placement_group(group)
        del store
    return read_final_metrics(prepared.run_dir)


class LiveWorkers:
    """The driver's view of the live group: starts, replaces and awaits the actors.

    A lost actor (its process died) is replaced once per loss, at most
    `max(num_workers, max_failures)` times in a run, by a new actor in the freed bundle that
    joins at the members' next step boundary.
    Once a worker finishes, the others get `FINISH_GRACE_S` to finish too; a replacement
    still waiting to join then is stopped.
    """

    FINISH_GRACE_S = 60.0

    def __init__(self, group: Any, cluster: Any, store_addr: tuple[str, int], config: dict) -> None:
        self.group, self.cluster, self.store_addr, self.config = group, cluster, store_addr, config
        self.actors: list[Any] = []
        self.pending: dict[Any, tuple[int, int]] = {}  # task -> (member id, bundle)
        self.replacements = 0

    def start(self, member: int, bundle: int, joining: bool) -> None:
        """One `LiveWorker` actor in `bundle`, running as `member`."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor = (
            ray.remote(LiveWorker)
            .options(
                num_cpus=self.cluster.cpus_per_worker,
                num_gpus=self.cluster.gpus_per_worker,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=bundle
                ),
            )
            .remote()
        )
        world = self.cluster.num_workers
        task = actor.run.remote(member, world, self.store_addr, self.config, joining)
        self.actors.append(actor)
        self.pending[task] = (member, bundle)

    def run(self) -> None:
        """Start every worker and wait for the survivors (see the class docstring)."""
        import ray

        world = self.cluster.num_workers
        for member in range(world):
            self.start(member, member, joining=False)
        finished: list[int] = []
        while self.pending:
            timeout = self.FINISH_GRACE_S if finished else None
            done, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
            if not done:
                break  # the run is over; what still waits is a replacement never admitted
            if self.collect(done[0]):
                finished.append(self.pending.pop(done[0])[0])
        if not finished:
            raise ClusterError("every worker of the live group was lost")

    def collect(self, task: Any) -> bool:
        """True when `task` finished (still pending); a lost worker is dropped from `pending`
        and replaced; a failed one raises its error."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            ray.get(task)
            return True
        except RayActorError:
            member, bundle = self.pending.pop(task)
            logger.warning("worker %d was lost; the others go on without it", member)
            if self.replacements < max_replacements(self.cluster):
                self.replacements += 1
                self.start(self.cluster.num_workers - 1 + self.replacements, bundle, True)
            return False
        except RayTaskError as exc:
            raise worker_error(exc) from exc

    def kill(self) -> None:
        """Stop every actor this group started."""
        import ray

        for actor in self.actors:
            ray.kill(actor)


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
