"""roundhouse's own worker group for `cluster.recovery: live`: Ray core actors, not Ray Train.

Ray Train tears the whole group down when one worker dies; live recovery needs the survivors
to keep their processes. So for `recovery: live` the driver:

1. holds the rendezvous store itself (a `TCPStore` in the driver process, which outlives any
   worker) on this node's address;
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
from roundhouse.config import JobSpec
from roundhouse.errors import RoundhouseError
from roundhouse.parallel.net import free_port
from roundhouse.runs.metrics_file import read_final_metrics
from roundhouse.trainer import PreparedRun, WorkerContext, run_worker

logger = logging.getLogger(__name__)

PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


class LiveWorker:
    """One worker process of the live group (a Ray actor; see the module docstring)."""

    def run(self, member: int, world: int, store_addr: tuple[str, int], config: dict) -> dict:
        """Join generation 0 as `member` of `world` and train; return the final metrics."""
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
        group.init()
        ctx = WorkerContext(
            rank=member, world_size=world, node_rank=member, num_nodes=world, rendezvous=group
        )
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
    config = {
        "job": job.model_dump(mode="json"),
        "env": env,
        "resume": resume,
        "resume_step": prepared.resume_step,
    }
    actors = start_actors(group, cluster)
    try:
        with RunMonitor(job, prepared.run_dir, time.time()):
            wait_for_survivors(actors, (host, port), config)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)
        del store
    return read_final_metrics(prepared.run_dir)


def start_actors(group: Any, cluster: Any) -> list[Any]:
    """One `LiveWorker` actor per bundle of the placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    remote = ray.remote(LiveWorker)
    return [
        remote.options(
            num_cpus=cluster.cpus_per_worker,
            num_gpus=cluster.gpus_per_worker,
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=i
            ),
        ).remote()
        for i in range(cluster.num_workers)
    ]


def wait_for_survivors(actors: list[Any], store_addr: tuple[str, int], config: dict) -> None:
    """Run every actor; a lost actor is logged, a raising one ends the run with its error."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    world = len(actors)
    pending = {actor.run.remote(i, world, store_addr, config): i for i, actor in enumerate(actors)}
    finished, lost = [], []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        member = pending.pop(done[0])
        try:
            ray.get(done[0])
            finished.append(member)
        except RayActorError:
            lost.append(member)
            logger.warning("worker %d was lost; the others go on without it", member)
        except RayTaskError as exc:
            raise worker_error(exc) from exc
    if not finished:
        raise ClusterError(f"every worker of the live group was lost ({lost})")


def worker_error(exc: Exception) -> Exception:
    """The `RoundhouseError` a worker raised, if that is what failed; else one line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RoundhouseError):
        return cause
    text = str(exc).strip().splitlines()
    return ClusterError(f"a live worker failed: {text[-1] if text else type(exc).__name__}")
