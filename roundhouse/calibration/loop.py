"""Calibration of the job's own training step, through roundhouse's loop pieces (cached).

`loop_rate` runs one spawned rank (`ranks.run_ranks`: its own one-rank process group and
`cpus_per_worker` threads). There `build_trainer` builds
the job as a worker would (data loader, model, task, strategy, optimizer, scheduler) and each
step's pieces are timed as `Trainer.train_step` runs them:

- the one-device reference strategy at two micro-batch sizes: the next batch from the loader
  plus the finite-loss check and the loss items' count (`loop_s`), `forward_backward` with the
  loss read back (`fwd_bwd(B) = overhead_s + per_sample_s x B`), and `optimizer_step` with the
  gradient norm (`optimizer_s`: norm, clip, optimizer, scheduler, zero_grad);
- every engine a registered cost model names (`CostModel.engines`: DeepSpeed's ZeRO-2 and
  ZeRO-3) on one rank at the smaller size: what the engine adds to `forward_backward` (its
  gradient hooks) and its `optimizer_step`. At one rank the exchange is empty, so these are
  the engine's own CPU costs; the collectives stay the link model's.

The result is cached per host, device, thread count, model, optimizer and micro-batch sizes
(`cache.cached`), so a second plan on the same machine measures nothing.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch

from roundhouse.calibration.ranks import run_ranks
from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.parallel.registry import REFERENCE_SECTION, cost_models

logger = logging.getLogger(__name__)

TIMEOUT_S = 300
BUDGET_S = 2.5  # measured seconds per configuration (at least MIN_STEPS steps)
WARMUP_STEPS, MIN_STEPS, MAX_STEPS = 2, 3, 12
# The job's own step on one rank: up to this many steps within `BUDGET_S` (a step of a few
# milliseconds: 12 of them left the single-worker row 20-30% off from one plan to the next)
LOOP_MAX_STEPS = 60


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
    """Median seconds of a step's pieces (`loop_s`: data + finite check, `fwd_bwd_s`:
    forward+backward, `optimizer_s`) and of whole steps (`step_s`, as a run's logged step
    times are: a step's pieces are skewed, so their medians sum to less than a step's median),
    over at most `budget_s` seconds and `max_steps` steps after the warm-up, through as many
    epochs as that takes. The ranks of a group stop at the same step: the step's finite-loss
    vote (`Strategy.all_true`, which the loop casts too) carries whether each is within the
    budget."""
    strategy, loader = trainer.strategy, trainer.train_loader
    strategy.train_mode(True)
    steps = max_steps + WARMUP_STEPS
    pieces: dict[str, list[float]] = {
        "loop_s": [],
        "fwd_bwd_s": [],
        "optimizer_s": [],
        "step_s": [],
    }
    started = last = time.perf_counter()
    for i, micro_batches in enumerate(epochs(loader, trainer.state.epoch)):
        # As the loop does: a task with loss items counts the global batch's (one all-reduce).
        trainer.step_weights(micro_batches, loader.last_step_size)
        t0 = time.perf_counter()
        loss = strategy.forward_backward(micro_batches[0], loss_scale=1.0, sync=True)
        bool(torch.isfinite(loss))  # read back, as the loop reads it for its vote
        over = i - WARMUP_STEPS >= MIN_STEPS and last - started > budget_s
        go_on = strategy.all_true(not over)
        t1 = time.perf_counter()
        strategy.optimizer_step(need_grad_norm=True)
        t2 = time.perf_counter()
        if i >= WARMUP_STEPS:
            pieces["fwd_bwd_s"].append(t1 - t0)
            pieces["optimizer_s"].append(t2 - t1)
            pieces["loop_s"].append(t0 - last)
            pieces["step_s"].append(t2 - last)
        last = t2
        if i + 1 >= steps or not go_on:
            break
    return {k: statistics.median(v) for k, v in pieces.items() if v}


def epochs(loader: Any, epoch: int) -> Iterator[list[dict]]:
    """The loader's steps from epoch `epoch` on, moving to the next epoch as the loop's
    `end_epoch` does (none for an empty loader)."""
    while len(loader):
        yield from loader
        epoch += 1
        loader.load_state_dict({"epoch": epoch, "steps_done": 0})


def measure(job: JobSpec, device: str, sizes: tuple[int, int]) -> dict[str, float]:
    """Run every configuration (see the module doc) in this process; return the figures."""
    from roundhouse.parallel.context import build_local_context
    from roundhouse.runs.rundir import run_dir_of
    from roundhouse.trainer.run import build_trainer
    from roundhouse.weights.checkpoint import Checkpointer

    runs = [("small", sizes[0], REFERENCE_SECTION), ("large", sizes[1], REFERENCE_SECTION)]
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for costs in cost_models():
            runs += [
                (name, sizes[0], section)
                for name, section in costs.engines.items()
                if engine_runs(calibration_job(job, tmp, sizes[0], section))
            ]
        for name, batch, strategy in runs:
            spec = calibration_job(job, tmp, batch, strategy)
            checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
            torch.manual_seed(spec.trainer.seed)
            trainer = build_trainer(spec, build_local_context(device), checkpointer, None)
            try:
                pieces = time_pieces(trainer, max_steps=LOOP_MAX_STEPS)
            finally:
                trainer.strategy.close()
                trainer.tracker.close()
            out.update({f"{name}/{k}": v for k, v in pieces.items()})
    return out


def engine_runs(spec: JobSpec) -> bool:
    """Whether the engine's strategy takes the job (DeepSpeed refuses sparse-gradient models);
    a refused engine is not measured, and `plan` has no row for it either."""
    from roundhouse.errors import RoundhouseError
    from roundhouse.parallel.registry import get_strategy_class

    try:
        get_strategy_class(spec.strategy).check_job(spec, 1)
    except RoundhouseError as exc:
        logger.info("not calibrating %s: %s", spec.strategy.kind, exc)
        return False
    return True


def _measure_rank(rank: int, job_json: dict, device: str, sizes: tuple[int, int]) -> dict:
    return measure(validate_job(job_json, source="loop calibration"), device, sizes)


def measure_in_child(
    job: JobSpec, device: str, threads: int, sizes: tuple[int, int]
) -> dict[str, float]:
    """`measure` in a spawned process (see the module doc)."""
    return run_ranks(
        _measure_rank,
        (job.model_dump(mode="json"), device, sizes),
        world_size=1,
        threads=threads,
        timeout_s=TIMEOUT_S,
        what="step calibration",
        backend="nccl" if device == "cuda" else "gloo",
    )
