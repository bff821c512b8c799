"""The worker group: Ray Train's `TorchTrainer` running `trainer.run_worker` on every worker.

Ray Train creates the process group (gloo on CPU, nccl on GPU). Each worker builds its
`WorkerContext` (ranks grouped by Ray node id), records where it runs (`ranks/rank_<r>.json`)
and trains; rank 0 writes metrics and checkpoints to the run folder directly, so there is no
per-step Ray call, and the driver follows the run from that folder (`progress.RunMonitor`).
A restarted worker group (after a failure, under `cluster.max_failures`; smaller when
`cluster.min_workers` makes it elastic) resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from roundhouse.cluster.actor_pool import evict_idle
from roundhouse.cluster.capacity import wait_for_capacity, worker_resources
from roundhouse.cluster.preempt_relay import CONFIG_KEY as RELAY_CONFIG_KEY
from roundhouse.cluster.preempt_relay import register_worker, sigterm_relayed, start_relay
from roundhouse.cluster.progress import RunMonitor
from roundhouse.cluster.quiet import configure_worker_logging
from roundhouse.cluster.runtime import ClusterError
from roundhouse.cluster.services import CONFIG_KEY as SERVICES_CONFIG_KEY
from roundhouse.cluster.services import attach_services, services_stopped_at_exit, start_services
from roundhouse.cluster.topology import describe_rank, write_rank_record
from roundhouse.config import ClusterConfig, JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.errors import RoundhouseError
from roundhouse.runs.metrics_file import read_final_metrics
from roundhouse.runs.rundir import run_dir_of
from roundhouse.trainer import WorkerContext, run_worker
from roundhouse.trainer.preemption import Preempted, forward_sigterm_to_loops
from roundhouse.weights.checkpoint import Checkpointer
from roundhouse.weights.run_folder import PreparedRun

logger = logging.getLogger(__name__)

PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


SECRET_WORKER_ENV = ("WANDB_API_KEY",)


def worker_env(job: JobSpec) -> dict[str, str]:
    """Environment for every worker process: threads and the strategy's needs.

    `worker_main` sets it before anything reads it (torch threads, DeepSpeed's accelerator,
    W&B), so no Ray runtime environment is needed for it: a worker group with one cannot use
    the worker processes Ray started ahead of time, which costs seconds at every start.
    Secrets are not in it (see `worker_runtime_env`).
    """
    threads = str(max(1, int(job.cluster.cpus_per_worker)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "WANDB_SILENT": "true"}
    if job.cluster.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed must not look for CUDA on CPU workers
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def worker_runtime_env() -> dict[str, Any] | None:
    """The workers' Ray runtime environment: only the secrets set here (`WANDB_API_KEY`), which
    must not travel in the train loop's config; None (Ray's prestarted workers) without any."""
    secrets = {key: os.environ[key] for key in SECRET_WORKER_ENV if key in os.environ}
    return {"env_vars": secrets} if secrets else None


def is_elastic(cluster: ClusterConfig) -> bool:
    """`cluster.min_workers` below `num_workers`: the group may shrink instead of waiting."""
    return cluster.min_workers is not None and cluster.min_workers < cluster.num_workers


def build_scaling_config(cluster: ClusterConfig) -> Any:
    """Ray Train's `ScalingConfig`; elastic `(min, max)` workers when `min_workers` is set."""
    from ray.train import ScalingConfig

    num_workers: int | tuple[int, int] = cluster.num_workers
    if is_elastic(cluster):
        num_workers = (cluster.min_workers, cluster.num_workers)  # type: ignore[assignment]
    return ScalingConfig(
        num_workers=num_workers,
        use_gpu=cluster.gpus_per_worker > 0,
        resources_per_worker=worker_resources(cluster),
        placement_strategy=PLACEMENT[cluster.placement],
    )


def build_failure_config(cluster: ClusterConfig) -> Any:
    """Restart budget: `max_failures` worker-group failures.

    Ray Train counts a failure while a group starts (a worker lost before training begins,
    or a group that cannot be scheduled within `schedule_timeout_s`) as a controller failure,
    under a budget of its own. A fixed-size group gets `max_failures` of those too: a kill
    that lands while the group after the last kill is starting is one more failure, not the
    end of the run; with the default 0 a group that cannot be scheduled still fails at once
    (Ray's default would retry forever). An elastic group retries without limit: after
    losing a node, Ray's view of the cluster is refreshed only every ~20 s, so its first
    restart may ask for the old size and time out before it shrinks.
    """
    from ray.train import FailureConfig

    return FailureConfig(
        max_failures=cluster.max_failures,
        controller_failure_limit=-1 if is_elastic(cluster) else cluster.max_failures,
    )


def train_on_ray(
    prepared: PreparedRun,
    *,
    resume: bool,
    strategy_by_size: dict[int, Any] | None = None,
    queue_timeout_s: float | None = None,
) -> dict[str, float]:
    """Run the job on `cluster.num_workers` Ray workers; return rank 0's final metrics.

    Waits (at most `cluster.schedule_timeout_s`) for the cluster to be able to host the group,
    then runs `TorchTrainer.fit()` while a `RunMonitor` shows progress and restarts from the
    run folder. The group's placement group may then wait `queue_timeout_s` for other groups
    to free their resources (default `cluster.schedule_timeout_s`; a sweep's trials queue).
    """
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if prepared.job.cluster.recovery == "live":  # roundhouse's own actor group: survivors go on
        from roundhouse.cluster.live_group import train_live_on_ray

        return train_live_on_ray(
            prepared, resume=resume, env=worker_env(prepared.job), runtime_env=worker_runtime_env()
        )
    job = prepared.job
    cluster = job.cluster
    evict_idle()  # warm live-group actors hold resources this group may need
    wait_for_capacity(cluster)
    services = start_services(job)  # the strategy's driver-side services, if it asks for any
    started = time.time()  # checkpoints newer than this come from a failed attempt
    relay = start_relay()  # SIGTERM to this driver reaches the workers through it
    trainer = TorchTrainer(
        train_loop_per_worker=worker_main,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "resume": resume,
            "resume_step": prepared.resume_step,
            "started": started,
            "env": worker_env(job),
            SERVICES_CONFIG_KEY: services,
            RELAY_CONFIG_KEY: relay,
            # strategy.kind=auto on an elastic group: the planned strategy per world size
            "strategy_by_size": {str(k): v for k, v in (strategy_by_size or {}).items()},
        },
        scaling_config=build_scaling_config(cluster),
        torch_config=TorchConfig(
            backend="nccl" if cluster.gpus_per_worker else "gloo",
            timeout_s=int(cluster.collective_timeout_s),
        ),
        run_config=RunConfig(
            name=f"{job.name}-{job.storage.run_id}",
            storage_path=ray_storage_path(prepared),
            failure_config=build_failure_config(cluster),
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    with (
        controller_env(queue_timeout_s or cluster.schedule_timeout_s),
        RunMonitor(job, prepared.run_dir, started),
        services_stopped_at_exit(services),
        sigterm_relayed(relay, cluster.preempt_grace_s),
    ):
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; surface the worker's own message
            raise unwrap_worker_error(exc, cluster) from exc
    raise_if_preempted(getattr(result, "return_value", None))
    # Rank 0 wrote them to the run folder; no ray.train.report needed (it costs ~1.3 s).
    return read_final_metrics(prepared.run_dir)


@contextlib.contextmanager
def controller_env(start_timeout_s: float) -> Iterator[None]:
    """Settings Ray Train's controller reads from the driver's environment, for one fit().

    `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` bounds how long a worker group may wait for its
    placement group (`start_timeout_s`); Ray propagates it to the controller.
    """
    saved = os.environ.get(START_TIMEOUT_ENV)
    os.environ[START_TIMEOUT_ENV] = str(start_timeout_s)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(START_TIMEOUT_ENV, None)
        else:
            os.environ[START_TIMEOUT_ENV] = saved


def ray_storage_path(prepared: PreparedRun) -> str:
    """Where Ray Train keeps its own bookkeeping: inside the run folder when it is local."""
    local = prepared.run_dir.local_path()
    return os.path.join(local, "ray") if local else os.path.join(os.getcwd(), ".ray_results")


def unwrap_worker_error(exc: Exception, cluster: ClusterConfig | None = None) -> Exception:
    """A `RoundhouseError` raised on a worker, if that is what failed; else one line for Ray's.

    A worker group that could not be scheduled in time becomes a `ClusterError` naming the
    request and `cluster.schedule_timeout_s`.
    """

    for current in _causes(exc):
        if isinstance(current, RoundhouseError):
            return current
        if type(current).__name__ == "WorkerGroupStartupTimeoutError" and cluster is not None:
            return ClusterError(
                f"the worker group ({cluster.num_workers} x {worker_resources(cluster)}, "
                f"placement {cluster.placement}) could not be scheduled within "
                f"cluster.schedule_timeout_s={cluster.schedule_timeout_s:g} s",
                "free or add resources, lower the request, or raise cluster.schedule_timeout_s",
            )
    text = str(exc).strip().splitlines()
    return ClusterError(f"training on Ray failed: {text[-1] if text else type(exc).__name__}")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it wraps: worker failures, controller failures, causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        for attr in ("worker_failures", "errors"):
            nested = getattr(current, attr, None)
            if isinstance(nested, dict) and nested:
                current = next(iter(nested.values()))
                break
        else:
            current = (
                getattr(current, "controller_failure", None)
                or current.__cause__
                or getattr(current, "cause", None)
            )


def worker_main(config: dict[str, Any]) -> dict[str, Any] | None:
    """Entry point on every Ray worker (run again by Ray on every restart of the group)."""
    os.environ.update(config["env"])
    configure_worker_logging()  # levels on the lines, for the driver's quiet console
    import ray
    import ray.train
    import torch

    job = validate_job(config["job"], source="worker")
    ctx = build_worker_context(ray.train.get_context(), job)
    job = strategy_for_size(job, config.get("strategy_by_size", {}), ctx.world_size)
    ctx = attach_services(ctx, config)  # the strategy's services, if it asked for any
    torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))
    resume, step = choose_resume_point(job, config)
    runtime = ray.get_runtime_context()
    record = describe_rank(
        ctx,
        node_id=runtime.get_node_id(),
        node_ip=ray.util.get_node_ip_address(),
        resume_step=step if resume else None,
    )
    write_rank_record(run_dir_of(job), record)
    forward_sigterm_from_main_thread()
    register_worker(config, ctx.rank)  # SIGTERM to the driver comes through the relay
    try:
        run_worker(worker_job(job), ctx, resume_step=step, resume=resume)
    except Preempted as exc:  # every rank stops at the same step, its checkpoint complete
        # A normal return, so that Ray Train does not restart the group (`max_failures`);
        # the driver raises it again (`raise_if_preempted`).
        return {PREEMPTED_KEY: [exc.what, exc.fix]}
    return None


PREEMPTED_KEY = "preempted"


def forward_sigterm_from_main_thread(timeout_s: float = 30.0) -> None:
    """Let SIGTERM to this Ray Train worker preempt the loop (`trainer.preemption`).

    Ray Train runs the train function in a thread, where no signal handler can be installed.
    The worker actor's main thread is free between Ray Train's calls (it polls each worker
    every `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`), so a call on this actor (`__ray_call__`, run
    on that thread) installs the forwarder there; the handler runs at the next poll.
    """
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
        ok = ray.get(actor.__ray_call__.remote(_install_forwarder), timeout=timeout_s)
    except Exception as exc:  # train on; only preemption is lost
        ok = False
        logger.debug("no SIGTERM forwarder: %s", exc)
    if not ok:
        logger.warning("SIGTERM to this worker ends it without a checkpoint (no forwarder)")


def _install_forwarder(_actor: Any) -> bool:
    return forward_sigterm_to_loops()


def raise_if_preempted(returned: Any) -> None:
    """Raise `Preempted` when rank 0's train function says the run was preempted."""
    if isinstance(returned, dict) and PREEMPTED_KEY in returned:
        what, fix = returned[PREEMPTED_KEY]
        raise Preempted(what, fix)


def strategy_for_size(job: JobSpec, by_size: dict[str, Any], world_size: int) -> JobSpec:
    """The job with the strategy planned for `world_size` (`strategy.kind: auto`, elastic)."""
    planned = by_size.get(str(world_size))
    if planned is None or planned == job.strategy.model_dump(exclude_defaults=True):
        return job
    logger.warning("world size %d: running the strategy planned for it, %s", world_size, planned)
    return job.with_strategy(planned, source="elastic resize")


def worker_job(job: JobSpec) -> JobSpec:
    """The job as workers run it: the driver owns the console (see `RunMonitor`)."""
    quiet = job.model_copy(deep=True)
    quiet.tracking.console = "off"
    return quiet


def choose_resume_point(job: JobSpec, config: dict[str, Any]) -> tuple[bool, int | None]:
    """The job's own resume point, or, after Ray restarted the group, the newest checkpoint."""

    checkpointer = Checkpointer(run_dir_of(job), keep_last=1, identity={})
    latest = checkpointer.latest_step()
    if latest is not None and checkpointer.manifest(latest)["created"] > config["started"]:
        logger.warning("worker group restarted: resuming from checkpoint step %d", latest)
        return True, latest
    return config["resume"], config["resume_step"]


def build_worker_context(train_ctx: Any, job: JobSpec) -> Any:
    """`WorkerContext` from Ray Train's context and the Ray node ids of all ranks.

    Ray Train numbers nodes by IP address, so several Ray nodes on one address (containers
    with host networking, `ray.cluster_utils.Cluster`) would count as one node. Ranks are
    grouped by Ray node id instead (one all-gather when the worker starts).
    """
    import ray
    import torch
    from ray.train.torch import get_device

    rank, world_size = train_ctx.get_world_rank(), train_ctx.get_world_size()
    node_ids = gather_node_ids(ray.get_runtime_context().get_node_id(), world_size)
    device = get_device() if job.cluster.gpus_per_worker else torch.device("cpu")
    layout = node_layout(node_ids, rank)
    return WorkerContext(rank=rank, world_size=world_size, device=device, **layout)


def gather_node_ids(node_id: str, world_size: int) -> list[str]:
    """Every rank's Ray node id, by rank (an all-gather on the default process group)."""
    import torch.distributed as dist

    if world_size == 1 or not dist.is_initialized():
        return [node_id]
    node_ids: list[Any] = [None] * world_size
    dist.all_gather_object(node_ids, node_id)
    return [str(n) for n in node_ids]


def node_layout(node_ids: list[str], rank: int) -> dict[str, int]:
    """`node_rank`, `num_nodes`, `local_rank`, `local_world_size` of `rank`.

    Nodes are numbered in the order of their lowest rank; within a node, local ranks follow
    world ranks.
    """
    nodes = list(dict.fromkeys(node_ids))
    mine = node_ids[rank]
    local = [r for r, n in enumerate(node_ids) if n == mine]
    return {
        "node_rank": nodes.index(mine),
        "num_nodes": len(nodes),
        "local_rank": local.index(rank),
        "local_world_size": len(local),
    }
