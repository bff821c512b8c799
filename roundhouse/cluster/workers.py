"""The worker group: Ray Train's `TorchTrainer` running `trainer.run_worker` on every worker.

Ray Train creates the process group (gloo on CPU, nccl on GPU). Each worker builds its
`WorkerContext` from Ray Train's context and trains; rank 0 writes metrics and checkpoints to
the run folder directly, so there is no per-step Ray call. A restarted worker group (after a
failure, under `cluster.max_failures`) resumes from the run's latest checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from roundhouse.cluster.runtime import ClusterError
from roundhouse.spec import ClusterConfig, JobSpec
from roundhouse.trainer import PreparedRun
from roundhouse.trainer.metrics_file import read_final_metrics

logger = logging.getLogger(__name__)

PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


def worker_env(job: JobSpec) -> dict[str, str]:
    """Environment for every worker process: threads and the strategy's needs."""
    threads = str(max(1, int(job.cluster.cpus_per_worker)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "WANDB_SILENT": "true"}
    if job.cluster.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed must not look for CUDA on CPU workers
    for key in ("WANDB_API_KEY", "TORCH_EXTENSIONS_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def build_scaling_config(cluster: ClusterConfig) -> Any:
    from ray.train import ScalingConfig

    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.gpus_per_worker:
        resources["GPU"] = cluster.gpus_per_worker
    return ScalingConfig(
        num_workers=cluster.num_workers,
        use_gpu=cluster.gpus_per_worker > 0,
        resources_per_worker=resources,
        placement_strategy=PLACEMENT[cluster.placement],
    )


def train_on_ray(prepared: PreparedRun, *, resume: bool) -> dict[str, float]:
    """Run the job on `cluster.num_workers` Ray workers; return rank 0's final metrics."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job = prepared.job
    cluster = job.cluster
    trainer = TorchTrainer(
        train_loop_per_worker=worker_main,
        train_loop_config={
            "job": job.model_dump(mode="json"),
            "resume": resume,
            "resume_step": prepared.resume_step,
            "started": time.time(),  # checkpoints newer than this come from a failed attempt
        },
        scaling_config=build_scaling_config(cluster),
        torch_config=TorchConfig(
            backend="nccl" if cluster.gpus_per_worker else "gloo",
            timeout_s=int(cluster.collective_timeout_s),
        ),
        run_config=RunConfig(
            name=f"{job.name}-{job.storage.run_id}",
            storage_path=ray_storage_path(prepared),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            worker_runtime_env={"env_vars": worker_env(job)},
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; surface the worker's own message
        raise unwrap_worker_error(exc) from exc
    # Rank 0 wrote them to the run folder; no ray.train.report needed (it costs ~1.3 s).
    return read_final_metrics(prepared.run_dir)


def ray_storage_path(prepared: PreparedRun) -> str:
    """Where Ray Train keeps its own bookkeeping: inside the run folder when it is local."""
    local = prepared.run_dir.local_path()
    return os.path.join(local, "ray") if local else os.path.join(os.getcwd(), ".ray_results")


def unwrap_worker_error(exc: Exception) -> Exception:
    """A `RoundhouseError` raised on a worker, if that is what failed; else the Ray error."""
    from roundhouse.errors import RoundhouseError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RoundhouseError):
            return current
        for attr in ("worker_failures", "errors"):
            nested = getattr(current, attr, None)
            if isinstance(nested, dict) and nested:
                current = next(iter(nested.values()))
                break
        else:
            current = current.__cause__ or getattr(current, "cause", None)
    text = str(exc).strip().splitlines()
    return ClusterError(f"training on Ray failed: {text[-1] if text else type(exc).__name__}")


def worker_main(config: dict[str, Any]) -> None:
    """Entry point on every Ray worker."""
    import ray.train
    import torch

    from roundhouse.trainer import run_worker

    job = JobSpec.model_validate(config["job"])
    ctx = build_worker_context(ray.train.get_context(), job)
    torch.set_num_threads(max(1, int(job.cluster.cpus_per_worker)))
    resume, step = choose_resume_point(job, config)
    run_worker(job, ctx, resume_step=step, resume=resume)


def choose_resume_point(job: JobSpec, config: dict[str, Any]) -> tuple[bool, int | None]:
    """The job's own resume point, or, after Ray restarted the group, the newest checkpoint."""
    from roundhouse.trainer.checkpoint import Checkpointer
    from roundhouse.trainer.run import run_dir_of

    checkpointer = Checkpointer(run_dir_of(job), keep_last=1, identity={})
    latest = checkpointer.latest_step()
    if latest is not None and checkpointer.manifest(latest)["created"] > config["started"]:
        logger.warning("worker group restarted: resuming from checkpoint step %d", latest)
        return True, latest
    return config["resume"], config["resume_step"]


def build_worker_context(train_ctx: Any, job: JobSpec) -> Any:
    """`WorkerContext` from Ray Train's context (node count agreed with one all-reduce)."""
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device

    from roundhouse.trainer import WorkerContext

    node_rank = train_ctx.get_node_rank()
    num_nodes = torch.tensor([node_rank + 1])
    if dist.is_initialized():
        dist.all_reduce(num_nodes, op=dist.ReduceOp.MAX)
    device = get_device() if job.cluster.gpus_per_worker else torch.device("cpu")
    return WorkerContext(
        rank=train_ctx.get_world_rank(),
        world_size=train_ctx.get_world_size(),
        local_rank=train_ctx.get_local_rank(),
        local_world_size=train_ctx.get_local_world_size(),
        node_rank=node_rank,
        num_nodes=int(num_nodes.item()),
        device=device,
    )
