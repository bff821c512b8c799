"""One worker actor of roundhouse's own group (`cluster.recovery: live`).

The actor trains in a thread and keeps its main thread free for the driver's calls, as Ray
Train's worker does: `start` returns at once, `poll` reports (and renews the driver's claim,
`actor_pool.Lease`), `claim`/`release` let a warm actor serve run after run. SIGTERM reaches
the loop through the main thread's forwarder (`trainer.preemption.forward_sigterm_to_loops`),
whose handler runs at the driver's next poll.

Before each run the actor puts back what a run may change in its process: the environment
variables, the working directory, torch's thread count and determinism switches; every run
seeds its RNGs itself (`run_worker`). So a run on a reused actor trains exactly as on a
fresh one.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import threading
from typing import Any

from roundhouse.cluster.actor_pool import Lease
from roundhouse.cluster.quiet import configure_worker_logging
from roundhouse.cluster.services import attach_services
from roundhouse.cluster.topology import describe_rank, write_rank_record
from roundhouse.config import JobSpec
from roundhouse.runs.rundir import run_dir_of
from roundhouse.trainer import WorkerContext, run_worker
from roundhouse.trainer.preemption import forward_sigterm_to_loops, notify_loops
from roundhouse.weights.model_build import build_model_with_data

logger = logging.getLogger(__name__)

RUNNING, DONE = "running", "done"


class LiveWorker:
    """One worker process of the live group (a Ray actor; see the module docstring).

    Args:
        keep_warm_s: how long the actor waits idle for another run (pooled actors); None for
            an actor that serves one run and ends with its driver.
        token: the run that started it (pooled actors start claimed by it).
    """

    def __init__(self, keep_warm_s: float | None = None, token: str | None = None) -> None:
        forward_sigterm_to_loops()  # sync actor: __init__ runs on the main thread
        self.base_env, self.base_cwd = dict(os.environ), os.getcwd()
        self.lease = Lease(keep_warm_s or 0.0, token)
        if keep_warm_s is not None:
            self.lease.watch(end_process)
        self.thread: threading.Thread | None = None
        self.outcome: dict[str, Any] = {}

    def ready(self) -> int:
        """The actor is up; its process id."""
        return os.getpid()

    def claim(self, token: str) -> bool:
        """Take this (idle) actor for the run `token`; False when another run holds it."""
        return self.lease.claim(token)

    def renew(self, token: str) -> None:
        """The run `token` still wants this actor (its claim's lease goes on)."""
        self.lease.renew(token)

    def start(
        self,
        token: str,
        member: int,
        world: int,
        store_addr: tuple[str, int],
        config: dict,
        joining: bool = False,
    ) -> None:
        """Begin training as `member` of `world` (see `train_member`) in a thread."""
        if not self.lease.claim(token):
            raise RuntimeError(f"this worker is claimed by another run than {token}")
        if self.thread is not None and self.thread.is_alive():
            raise RuntimeError("this worker is still running a run")
        reset_process(self.base_env, self.base_cwd)
        self.outcome = {}
        args = (member, world, store_addr, config, joining)
        self.thread = threading.Thread(target=self._train, args=args, name="roundhouse-train")
        self.thread.start()

    def _train(self, *args: Any) -> None:
        try:
            self.outcome[DONE] = train_member(*args)
        except BaseException as exc:
            self.outcome["error"] = exc

    def poll(self, token: str) -> dict[str, Any] | None:
        """None while training; the final metrics when done; raises the run's error."""
        self.lease.renew(token)
        if self.thread is None or self.thread.is_alive():
            return None
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome.get(DONE, {})

    def preempt(self, token: str) -> bool:
        """The driver got SIGTERM: stop at the next step boundary as if this worker had."""
        self.lease.renew(token)
        return notify_loops()

    def release(self, token: str) -> bool:
        """Idle again, if the run `token` is over here; False (end me) when it is not."""
        if self.lease.token not in (None, token):
            return False
        if self.thread is not None and self.thread.is_alive():
            return False
        self.thread, self.outcome = None, {}
        gc.collect()
        self.lease.release()
        return True


def end_process(reason: str) -> None:
    """End this actor's process (from its lease watchdog)."""
    logger.warning("warm worker %d ends: %s", os.getpid(), reason)
    os._exit(0)


def reset_process(base_env: dict[str, str], base_cwd: str) -> None:
    """Put back the process state a previous run may have changed (module docstring)."""
    import torch

    os.environ.clear()
    os.environ.update(base_env)
    os.chdir(base_cwd)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = False
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def record_rank(ctx: WorkerContext, job: JobSpec, resume_step: int | None) -> None:
    """Where this rank runs (`ranks/rank_<r>.json`, as on Ray Train's workers)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    node_ip = ray.util.get_node_ip_address()
    record = describe_rank(ctx, node_id=node_id, node_ip=node_ip, resume_step=resume_step)
    write_rank_record(run_dir_of(job), record)


def train_member(
    member: int, world: int, store_addr: tuple[str, int], config: dict, joining: bool
) -> dict:
    """Join generation 0 as `member` of `world` (or, `joining`, the running group at its
    next step boundary) and train; return the final metrics.

    A replacement builds its data and model before it asks to be admitted: the members wait
    at the admission only for what needs the group (the weights and state they send it)."""
    import ray
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
        store,
        member,
        list(range(world)),
        timeout_s=job.cluster.collective_timeout_s,
        host=ray.util.get_node_ip_address(),  # where its heartbeat's pulse port listens
    )
    quiet = job.model_copy(deep=True)
    quiet.tracking.console = "off"  # the driver owns the console (RunMonitor)
    prebuilt = build_model_with_data(quiet) if joining else None
    group.join() if joining else group.init()
    rank, size = group.rank, group.world_size
    ctx = WorkerContext(
        rank=rank, world_size=size, node_rank=rank, num_nodes=size, rendezvous=group
    )
    ctx = attach_services(ctx, config)  # ps: the shard servers, which outlive any worker
    record_rank(ctx, job, config["resume_step"] if config["resume"] else None)
    try:
        return run_worker(
            quiet,
            ctx,
            resume_step=config["resume_step"],
            resume=config["resume"],
            prebuilt=prebuilt,
        )
    finally:
        group.close()
        if dist.is_initialized():
            dist.destroy_process_group()
