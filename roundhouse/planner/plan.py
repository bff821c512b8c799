"""`build_plan`: every candidate at every worker count, predicted, ranked, one recommended.

Rows that fit the device's memory rank first, then the rows at the job's own worker count
(`cluster.num_workers`, when the plan covers it: that is the cluster the job asks for), then
by samples/s (fastest first), then by memory. The recommendation is the first row; its reason
is one line, and it names a faster row at another worker count when there is one. When nothing
fits, `suggest_fix` names what would: more workers, an offload, or a smaller micro-batch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from roundhouse.config import JobSpec
from roundhouse.errors import RoundhouseError
from roundhouse.parallel.costs import (
    Candidate,
    JobShape,
    ModelProfile,
    Target,
    optimizer_moments,
)
from roundhouse.planner.candidates import enumerate_candidates
from roundhouse.planner.costs import Row, evaluate
from roundhouse.planner.target import JobModel, build_target, job_profile

logger = logging.getLogger(__name__)

GB = 1e9


class PlanError(RoundhouseError):
    """No strategy can run the job as asked (the message says what would)."""


@dataclass
class Plan:
    """A ranked plan; `rows[0]` is the recommendation when `fits`."""

    job: JobSpec
    profile: ModelProfile
    target: Target
    shape: JobShape
    rows: list[Row]
    reason: str

    @property
    def best(self) -> Row:
        """The recommended row (the first after ranking)."""
        return self.rows[0]

    @property
    def fits(self) -> bool:
        """Whether the recommended row fits the device's memory."""
        return bool(self.rows) and self.rows[0].fits


def job_shape(job: JobSpec) -> JobShape:
    """The job's batch, optimizer and precision figures that every candidate shares."""
    opt = job.trainer.optimizer
    return JobShape(
        global_batch=job.data.batch_size,
        grad_accum_steps=job.trainer.grad_accum_steps,
        optimizer_moments=optimizer_moments(opt.name, opt.momentum),
        remainder=job.data.remainder_policy,
        settings=job.strategy.model_dump(mode="json"),
        live_recovery=job.cluster.recovery == "live",
    )


def evaluate_all(
    profile: ModelProfile,
    target: Target,
    shape: JobShape,
    workers: list[int],
    kinds: tuple[str, ...] | None = None,
    runs: Callable[[Candidate], bool] = lambda c: True,
    prefer_workers: int | None = None,
) -> list[Row]:
    """Every candidate row for every worker count (those the batch cannot be split for, and
    those `runs` refuses, skipped), ranked (`rank_rows`)."""
    rows = []
    for n in workers:
        for candidate in enumerate_candidates(n, profile, shape, kinds):
            if not candidate.batch_splits:
                continue
            if not runs(candidate):
                continue
            rows.append(evaluate(candidate, profile, target, shape))
    return rank_rows(rows, shape, prefer_workers)


def rank_rows(rows: list[Row], shape: JobShape, prefer_workers: int | None = None) -> list[Row]:
    """Rows ordered for recommendation: fitting ones first, then those at `prefer_workers`
    (the job's own worker count), then by predicted samples/s."""
    return sorted(
        rows,
        key=lambda r: (
            not r.fits,
            prefer_workers is not None and r.candidate.workers != prefer_workers,
            -r.samples_per_s(shape.global_batch),
            r.memory.total,
        ),
    )


def strategy_accepts(job: JobSpec) -> Callable[[Candidate], bool]:
    """Whether a candidate's strategy runs `job`, by that strategy's own `check_job` (ps
    refuses gradient clipping, DeepSpeed ZeRO-3 a LoRA model, ...); memoised per section."""
    from roundhouse.parallel.registry import get_strategy_class

    seen: dict[str, bool] = {}

    def accepts(c: Candidate) -> bool:
        key = f"{c.workers}:{sorted(c.strategy.items())}"
        if key not in seen:
            spec = job.with_strategy(c.strategy, source=f"plan row {c.label}")
            try:
                get_strategy_class(spec.strategy).check_job(spec, c.workers)
                seen[key] = True
            except RoundhouseError as exc:
                logger.debug("no %s row on %d worker(s): %s", c.label, c.workers, exc)
                seen[key] = False
        return seen[key]

    return accepts


def _local_residuals(job: JobSpec, threads: int) -> dict[str, float]:
    """This machine's exchange residuals for `job`: its own, probed at 2 ranks where that is
    cheap, else the probe MLPs' fit; the probes' own plans are made without them."""
    from roundhouse.calibration.exchange import job_residuals, local_residuals

    def plan_probe(probe: JobSpec, workers: int) -> Plan:
        return build_plan(probe, [workers], "cpu", residuals=False)

    return job_residuals(job, threads, plan_probe) or local_residuals(threads, plan_probe)


def build_plan(
    job: JobSpec,
    workers: list[int],
    device: str,
    bandwidth: float | None = None,
    kinds: tuple[str, ...] | None = None,
    residuals: bool = True,
) -> Plan:
    """Plan `job` on `device` for each worker count in `workers` (`residuals=False`: without
    the exchange probe's residuals, as the probe plans itself)."""
    jm = JobModel(job)
    profile = job_profile(jm)
    probe = (lambda threads: _local_residuals(job, threads)) if residuals else None
    target = build_target(jm, profile, device, bandwidth, max(workers), probe)
    shape = job_shape(job)
    own = job.cluster.num_workers
    prefer = own if own in workers else None
    rows = evaluate_all(profile, target, shape, workers, kinds, strategy_accepts(job), prefer)
    plan = Plan(job, profile, target, shape, rows, "")
    plan.reason = explain(plan)
    return plan


def explain(plan: Plan) -> str:
    """One line: why the first row, or what would fit when nothing does."""
    if not plan.rows:
        return "no strategy can split this batch over these worker counts"
    best = plan.best
    if not best.fits:
        return suggest_fix(plan)
    fitting = [r for r in plan.rows if r.fits]
    batch = plan.shape.global_batch
    text = (
        f"{best.candidate.label} on {best.candidate.workers} worker(s): fastest of "
        f"{len(fitting)} fitting row(s), {best.samples_per_s(batch):,.1f} samples/s at "
        f"{best.memory.total / GB:.2f} of {plan.target.memory_bytes / GB:.0f} GB"
    )
    if len(fitting) > 1:
        runner = fitting[1]
        ratio = runner.step_s / best.step_s if best.step_s else 1.0
        other = f"{runner.candidate.label} on {runner.candidate.workers}"
        if ratio < 1.005:
            saved = (runner.memory.total - best.memory.total) / GB
            text += f"; ties with {other} in step time and needs {saved:.2f} GB less"
        else:
            text += f"; the next, {other}, takes {ratio:.2f}x as long per step"
    return text + faster_elsewhere(plan, fitting)


def faster_elsewhere(plan: Plan, fitting: list[Row]) -> str:
    """The fastest fitting row at another worker count, when it beats the recommendation
    (which is held to the job's own worker count); empty otherwise."""
    best, batch = plan.best, plan.shape.global_batch
    others = [r for r in fitting if r.candidate.workers != best.candidate.workers]
    if not others:
        return ""
    top = max(others, key=lambda r: r.samples_per_s(batch))
    gain = top.samples_per_s(batch) / best.samples_per_s(batch)
    if gain < 1.005:
        return ""
    n = top.candidate.workers
    return (
        f"; {top.candidate.label} on {n} worker(s) would be {gain:.2f}x faster "
        f"(set cluster.num_workers={n})"
    )


def suggest_fix(plan: Plan) -> str:
    """What would fit: more workers, offload, or a smaller micro-batch (gradient accumulation)."""
    shape, profile, target = plan.shape, plan.profile, plan.target
    runs = strategy_accepts(plan.job)
    most = max(r.candidate.workers for r in plan.rows)
    for n in (most * 2**k for k in range(1, 8)):
        rows = [r for r in evaluate_all(profile, target, shape, [n], None, runs) if r.fits]
        if rows:
            return (
                f"nothing fits {target.memory_bytes / GB:.0f} GB; {rows[0].candidate.label} "
                f"fits on {n} workers (pass --workers {n})"
            )
    for accum in (2**k for k in range(1, 12)):
        bigger = dataclasses.replace(shape, grad_accum_steps=shape.grad_accum_steps * accum)
        rows = [r for r in evaluate_all(profile, target, bigger, [most], None, runs) if r.fits]
        if rows:
            micro = rows[0].micro_batch
            return (
                f"nothing fits {target.memory_bytes / GB:.0f} GB; {rows[0].candidate.label} on "
                f"{most} fits with a micro-batch of {micro:g} "
                f"(set trainer.grad_accum_steps={bigger.grad_accum_steps})"
            )
    least = min(plan.rows, key=lambda r: r.memory.total)
    return (
        f"nothing fits {target.memory_bytes / GB:.0f} GB, not even "
        f"{least.candidate.label} ({least.memory.total / GB:.1f} GB, offloaded): pick a "
        "smaller model flavor or a device with more memory"
    )


def default_workers(job: JobSpec) -> list[int]:
    """1, 2, 4, ... up to `cluster.num_workers`, and `num_workers` itself."""
    top = job.cluster.num_workers
    counts = [2**k for k in range(int(math.log2(top)) + 1)]
    return sorted({*counts, top})
