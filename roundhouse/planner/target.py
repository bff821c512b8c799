"""From a job and `--device`/`--bandwidth` to what the planner computes with.

`job_profile` traces the job's model on the meta device; `build_target` picks the compute rate
(a calibrated step of the real model on this machine when it is small enough to build here, a
matmul calibration otherwise, or an accelerator's peak FLOP/s from the table) and the link.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from roundhouse import models
from roundhouse.calibration import cache as calibrate
from roundhouse.calibration.loop import job_key, measure_in_child
from roundhouse.calibration.trace import TRACE_BATCH, make_batch, profile_model
from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology
from roundhouse.errors import JobFileError
from roundhouse.parallel.costs import LinkRate, ModelProfile, StepRate, Target, optimizer_moments
from roundhouse.planner.devices import MFU, cpu_memory_bytes, get_accelerator

logger = logging.getLogger(__name__)

CALIBRATION_BUDGET_S = 20.0  # a model whose calibration would take longer is rated by matmul
NETWORK_LATENCY_S = 20e-6  # per collective step on a datacenter network (with --bandwidth)


class JobModel:
    """The job's model, task and data shapes, built once for tracing and calibration."""

    def __init__(self, job: JobSpec) -> None:
        from roundhouse.data import build_splits
        from roundhouse.trainer.task import build_task

        splits = build_splits(job.data, seed=job.trainer.seed)
        self.job = job
        self.input_shape = tuple(splits.info.input_shape)
        self.num_classes = splits.info.num_classes
        self.input_dtype = splits.input_dtype
        self.spec = models.get(job.model.name)
        self.task = build_task(self.spec.loss, job.trainer.loss)

    def build(self) -> torch.nn.Module:
        """The job's model, built from its model section (weights random)."""
        config = models.BuildConfig(
            flavor=self.job.model.flavor,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            options=self.job.model.options,
        )
        return models.build_model(self.job.model.name, config)

    def batch(self, size: int, device: str) -> dict[str, torch.Tensor]:
        """A batch of `size` samples of the job's input and target shapes on `device`."""
        meta = make_batch(
            self.spec.loss, self.input_shape, self.input_dtype, size, self.num_classes
        )
        if device == "meta":
            return meta
        return {
            k: (
                torch.randn(v.shape, dtype=v.dtype)
                if v.dtype.is_floating_point
                else torch.randint(0, self.num_classes, v.shape)
            ).to(device)
            for k, v in meta.items()
        }


def job_profile(jm: JobModel) -> ModelProfile:
    """Trace the job's model on the meta device (no weights allocated)."""
    with torch.device("meta"):
        model = jm.build()
    from roundhouse.parallel.deepspeed.config import model_kwargs

    return profile_model(
        model,
        jm.task,
        jm.batch(TRACE_BATCH, "meta"),
        jm.spec.pipeline_layers,
        model_kwargs(jm.job),
    )


def calibration_sizes(job: JobSpec, max_workers: int) -> tuple[int, int]:
    """The largest and smallest micro-batch the plan uses (one worker, `max_workers`)."""
    large = Topology.of_section(None, 1, **batch_of(job)).micro_batch
    small = Topology.of_section(None, max_workers, **batch_of(job)).micro_batch
    return (small if small < large else max(1, large // 2)), large


def batch_of(job: JobSpec) -> dict[str, Any]:
    """The job's batch arithmetic, as `Topology.of_section` takes it."""
    return {
        "global_batch": job.data.batch_size,
        "grad_accum_steps": job.trainer.grad_accum_steps,
        "remainder": job.data.remainder_policy,
    }


def loop_rate(job: JobSpec, device: str, threads: int, sizes: tuple[int, int]) -> StepRate:
    """The job's own step through roundhouse's loop pieces (`calibration/loop.py`), cached."""
    key = f"{device}/threads{threads}/loop/{job_key(job)}/{sizes[0]}-{sizes[1]}"
    figures = calibrate.cached(key, lambda: measure_in_child(job, device, threads, sizes))
    return StepRate.from_loop(figures, sizes)


def local_rate(
    jm: JobModel, profile: ModelProfile, device: str, threads: int, sizes: tuple[int, int]
) -> StepRate:
    """This machine's rate for the job's model: its own step if cheap enough, else matmul."""
    matmul = calibrate.matmul_rate(threads)
    small, large = sizes  # the calibration's steps: 5 at each size, single and two ZeRO stages
    expected_s = profile.step_flops * 5 * (3 * small + large) / matmul
    fits_here = profile.num_params * 16 < 0.25 * cpu_memory_bytes()
    if device == "cuda" or (fits_here and expected_s < CALIBRATION_BUDGET_S):
        return loop_rate(jm.job, device, threads, sizes)
    moments = optimizer_moments(jm.job.trainer.optimizer.name, jm.job.trainer.optimizer.momentum)
    opt_bytes = 4 * (3 + 2 * moments) * profile.num_params
    return StepRate(0.0, profile.step_flops / matmul, opt_bytes / calibrate.memory_rate(threads))


def build_target(
    jm: JobModel,
    profile: ModelProfile,
    device: str,
    bandwidth: float | None,
    max_workers: int,
    residuals: Callable[[int], dict[str, float]] | None = None,
) -> Target:
    """The `Target` for `--device` (see the module doc); `residuals(threads)` gives this
    machine's probed exchange residuals for a local CPU plan (`calibration/exchange.py`; None:
    none)."""
    job = jm.job
    accelerator = get_accelerator(device)
    bf16_asked = job.trainer.precision == "bf16"
    if accelerator is None and device.lower() == "cuda" and not torch.cuda.is_available():
        raise JobFileError(
            "planning for device cuda needs a GPU on this machine",
            "pass --device (or strategy.device) with an accelerator name such as H100-80GB",
        )
    if accelerator is None:
        threads = max(1, int(job.cluster.cpus_per_worker))
        sizes = calibration_sizes(job, max_workers)
        rate = _memo(lambda: local_rate(jm, profile, device.lower(), threads, sizes))
        link = LinkRate(NETWORK_LATENCY_S, bandwidth) if bandwidth else _local_link()
        on_gpu = device.lower() == "cuda"
        memory = torch.cuda.get_device_properties(0).total_memory if on_gpu else cpu_memory_bytes()
        autocast = bf16_asked or (on_gpu and job.trainer.precision == "auto")
        probed = residuals is not None and not bandwidth and not on_gpu
        extra = _memo(lambda: residuals(threads)) if probed else dict
        return Target(device, memory, rate, link, autocast, bf16_asked, on_gpu, extra)
    autocast = job.trainer.precision != "fp32"
    peak = accelerator.peak_bf16 if autocast else accelerator.peak_fp32
    moments = optimizer_moments(job.trainer.optimizer.name, job.trainer.optimizer.momentum)
    opt_s = 4 * (3 + 2 * moments) * profile.num_params / accelerator.hbm_bytes_per_s
    step = StepRate(0.0, profile.step_flops / (peak * MFU), opt_s)
    link = LinkRate(NETWORK_LATENCY_S, bandwidth or accelerator.link_bytes_per_s)
    return Target(
        accelerator.name,
        accelerator.memory_bytes,
        lambda: step,
        link,
        autocast,
        bf16_asked,
        overlap=True,
    )


def _local_link() -> LinkRate:
    from roundhouse.calibration.link import local_link

    return local_link()


def _memo(fn: Callable[[], Any]) -> Callable[[], Any]:
    box: list[Any] = []

    def call() -> Any:
        if not box:
            box.append(fn())
        return box[0]

    return call
