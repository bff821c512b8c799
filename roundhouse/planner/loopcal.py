"""Calibration of the job's own training step, through roundhouse's loop pieces (cached).

`loop_rate` spawns one process (its own one-rank process group and `cpus_per_worker` threads,
so the caller's process group and thread count stay untouched). There `build_trainer` builds
the job as a worker would (data loader, model, task, strategy, optimizer, scheduler) and each
step's pieces are timed as `Trainer.train_step` runs them:

- `single` at two micro-batch sizes: the next batch from the loader plus the finite-loss check
  (`loop_s`), `forward_backward` with the loss read back (`fwd_bwd(B) = overhead_s +
  per_sample_s x B`), and `optimizer_step` with the gradient norm (`optimizer_s`: norm, clip,
  optimizer, scheduler, zero_grad);
- DeepSpeed ZeRO-2 and ZeRO-3 on one rank at the smaller size: what the engine adds to
  `forward_backward` (its gradient hooks: ZeRO-2's copies into the reduce bucket and the
  partition, ZeRO-3's per-module gather/release hooks) and its `optimizer_step` (norm, fp32
  master weights, flat-buffer copies). At one rank the exchange is empty, so these are the
  engine's own CPU costs; the collectives stay the link model's.

The result is cached per host, device, thread count, model, optimizer and micro-batch sizes
(`calibrate.cached`), so a second plan on the same machine measures nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.planner.calibrate import run_spawned

logger = logging.getLogger(__name__)

TIMEOUT_S = 300
ZERO_STAGES = (2, 3)  # the engines calibrated (stages 0 and 1 use stage 2's figures)
BUDGET_S = 2.5  # measured seconds per configuration (at least MIN_STEPS steps)
WARMUP_STEPS, MIN_STEPS, MAX_STEPS = 2, 3, 12


def job_key(job: JobSpec) -> str:
    """What a calibration of `job`'s own step depends on: model, data, optimizer, precision."""
    m, opt = job.model, job.trainer.optimizer
    return (
        f"{m.name}:{m.flavor}:{sorted(m.options.items())}:{job.data.source}:"
        f"{sorted(job.data.options.items())}:{opt.name}:{job.trainer.precision}"
    )


def calibration_job(
    job: JobSpec, storage: str, batch: int, strategy: dict[str, Any], workers: int = 1
) -> JobSpec:
    """The job as `workers` workers run it at global batch `batch` (one step, one micro-batch
    each), with nothing written but a run."""
    data = job.model_dump(mode="json")
    data["data"]["batch_size"] = batch
    data["strategy"] = strategy
    data["trainer"].update(grad_accum_steps=1, max_steps=10**6, log_every_steps=1)
    data["trainer"]["checkpoint"] = {"every_epoch": False, "keep_last": 1}
    data["trainer"].pop("eval_every_steps", None)
    data["cluster"].update(num_workers=workers, min_workers=None)
    data["tracking"] = {"wandb": {"mode": "disabled"}, "console": "off"}
    label = "-".join(str(v) for v in strategy.values())
    data["storage"] = {"path": storage, "run_id": f"calibration-{label}-{batch}"}
    return validate_job(data, source="loop calibration")


def time_pieces(
    trainer: Any, budget_s: float = BUDGET_S, max_steps: int = MAX_STEPS
) -> dict[str, float]:
    """Median seconds of a step's pieces (data + finite check, forward+backward, optimizer),
    over at most `budget_s` seconds and `max_steps` steps after the warm-up (ranks of one group
    pass `math.inf`: they must all stop at the same step)."""
    strategy, loader = trainer.strategy, trainer.train_loader
    strategy.train_mode(True)
    steps = min(len(loader), max_steps + WARMUP_STEPS)
    pieces: dict[str, list[float]] = {"loop_s": [], "fwd_bwd_s": [], "optimizer_s": []}
    started = last = time.perf_counter()
    for i, micro_batches in enumerate(loader):
        t0 = time.perf_counter()
        loss = strategy.forward_backward(micro_batches[0], loss_scale=1.0, sync=True)
        strategy.all_true(bool(torch.isfinite(loss)))
        t1 = time.perf_counter()
        strategy.optimizer_step(need_grad_norm=True)
        t2 = time.perf_counter()
        if i >= WARMUP_STEPS:
            pieces["fwd_bwd_s"].append(t1 - t0)
            pieces["optimizer_s"].append(t2 - t1)
            pieces["loop_s"].append(t0 - last)
        last = t2
        measured = len(pieces["fwd_bwd_s"])
        if i + 1 >= steps or (measured >= MIN_STEPS and t2 - started > budget_s):
            break
    return {k: statistics.median(v) for k, v in pieces.items() if v}


def measure(job: JobSpec, device: str, sizes: tuple[int, int], zero: bool) -> dict[str, float]:
    """Run every configuration (see the module doc) in this process; return the figures."""
    from roundhouse.parallel.context import build_local_context
    from roundhouse.runs.rundir import run_dir_of
    from roundhouse.trainer.run import build_trainer
    from roundhouse.weights.checkpoint import Checkpointer

    runs = [("small", sizes[0], {"kind": "single"}), ("large", sizes[1], {"kind": "single"})]
    if zero:
        zeros = [{"kind": "deepspeed", "zero_stage": k} for k in ZERO_STAGES]
        runs += [(f"zero{z['zero_stage']}", sizes[0], z) for z in zeros]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, batch, strategy in runs:
            spec = calibration_job(job, tmp, batch, strategy)
            checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
            torch.manual_seed(spec.trainer.seed)
            trainer = build_trainer(spec, build_local_context(device), checkpointer, None)
            try:
                pieces = time_pieces(trainer)
            finally:
                trainer.strategy.close()
                trainer.tracker.close()
            out.update({f"{name}/{k}": v for k, v in pieces.items()})
    return out


def _child(job_json: dict, device: str, threads: int, sizes: tuple, zero: bool, queue) -> None:
    import torch.distributed as dist

    from roundhouse.parallel.net import free_port

    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)  # the engines' banners; failures still reach the parent
    warnings.simplefilter("ignore")  # torch's deprecations inside DeepSpeed, in every rank
    # One group for every engine: DeepSpeed keeps the first group it saw, so an engine must not
    # create (and destroy) its own.
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        queue.put(
            ("ok", measure(validate_job(job_json, source="loop calibration"), device, sizes, zero))
        )
    except BaseException as exc:  # the parent re-raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def measure_in_child(
    job: JobSpec, device: str, threads: int, sizes: tuple[int, int]
) -> dict[str, float]:
    """`measure` in a spawned process (see the module doc)."""
    zero = importlib.util.find_spec("deepspeed") is not None
    args = (job.model_dump(mode="json"), device, threads, sizes, zero)
    return run_spawned(_child, [args], TIMEOUT_S, "step calibration")
