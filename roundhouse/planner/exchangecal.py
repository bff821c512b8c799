"""What each strategy's own exchange path costs per step beyond the link model (cached).

The link model (`linkcal.py`) prices a collective as an idle gloo all-reduce: `latency +
bytes / bandwidth`. A strategy's real exchange on a CPU pays more per step than its bytes and
calls: ring's hand-offs to its communication thread, DeepSpeed's bucket bookkeeping and CPU
collectives, the parameter server's calls and its serial optimizer step in another process,
the pipeline schedule's per-step messages. Part of it is per step, part per module that owns
parameters (gradient hooks, ZeRO-3's gathers), and for the parameter server part per parameter
(its bytes go through the servers' transport, not gloo, and the server sums and steps them
alone). Two probes measure them, once per machine, through `measure_families`:

1. two spawned gloo ranks (`cpus_per_worker` threads each) train a probe job through
   roundhouse's loop pieces (`loopcal.time_pieces`) under ring, ps (sync, its server shards in
   a manager process, `parallel/ps/manager.py`), ZeRO-2, ZeRO-3 and 2 pipeline stages, each
   built `ROUNDS` times: the median seconds per step;
2. the plan of the same probe at 2 workers, without residuals, predicts each row;
3. `measured - predicted` is the family's residual at 2 ranks.

`job_residuals` probes the job itself (one step of its batch over the 2 ranks, its ps shards
and ring buckets) when its predicted probe steps fit `JOB_PROBE_BUDGET_S`: `<family>/step`,
kept only where positive (`costs.residual_s`). `local_residuals`, for a job too slow for that,
probes MLPs on digits with 1 and with 8 hidden layers of 64 (ps also one of 2 x 2048, 4.3M
parameters), 8 samples per rank, and fits each family's residual as `fixed + per_module x
modules` (both at least 0) through the two narrow probes, and for ps `+ per_param x
parameters` through the wide one.

`costs.residual_s` adds it to a row of that family (ring; ps; ZeRO 0-2; ZeRO-3; pipeline) on
this machine's CPU, scaled with the ring's `N - 1` steps (ps: with its `N` pushers, which the
server serves one after another; a pipeline: its stage boundaries and micro-batches). The ps
probe's transport is a `multiprocessing` manager, not Ray's actor calls, which a job uses: the
same server code and process layout, a different RPC cost. Accelerator targets and
`--bandwidth` plans (a cluster you are not on) use no residuals.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.planner.calibrate import run_spawned
from roundhouse.planner.costs import WORKERS_PROBED
from roundhouse.planner.loopcal import MAX_STEPS, WARMUP_STEPS, calibration_job, job_key

logger = logging.getLogger(__name__)

TIMEOUT_S = 300
PROBE_MICRO_BATCH = 8
WORKERS = WORKERS_PROBED
# Probed families: the strategy section each runs, and the plan row that predicts it.
PROBES: dict[str, tuple[str, dict[str, Any]]] = {
    "ring": ("ring", {"kind": "ring"}),
    "ps": ("ps", {"kind": "ps", "mode": "sync"}),
    "zero": ("zero2", {"kind": "deepspeed", "zero_stage": 2}),
    "zero3": ("zero3", {"kind": "deepspeed", "zero_stage": 3}),
    "pipeline": ("pipeline2", {"kind": "deepspeed", "zero_stage": 1, "pipeline_stages": 2}),
}
ROUNDS = 3  # each family is built and measured this many times; the median is kept
# The probe MLPs' hidden layers: 2 and 9 modules with parameters (5K and 34K parameters), and
# 4.3M parameters in 3 modules, for the families whose bytes cost more than the link's.
PROBE_MODELS: dict[str, list[int]] = {"shallow": [64], "deep": [64] * 8, "wide": [2048, 2048]}
WIDE_FAMILIES = ("ps",)  # its bytes go through the servers' transport, not gloo
# The job itself is the probe when its probe steps are predicted to take at most this long.
JOB_PROBE_BUDGET_S = 40.0
JOB_MIN_STEPS = 3  # measured steps per round of the job's own probe, at least


def probes_of(family: str) -> list[str]:
    """The probe models `family` is measured on."""
    return [name for name in PROBE_MODELS if name != "wide" or family in WIDE_FAMILIES]


def probe_job(threads: int, probe: str, storage: str = ".") -> JobSpec:
    """A probe job: the MLP `probe` of `PROBE_MODELS`, 2 workers of `threads` CPUs each."""
    return validate_job(
        {
            "name": "exchange-probe",
            "model": {"name": "mlp", "options": {"hidden_sizes": PROBE_MODELS[probe]}},
            "data": {"source": "builtin:digits", "batch_size": WORKERS * PROBE_MICRO_BATCH},
            "trainer": {
                "device": "cpu",
                "optimizer": {"name": "adam", "lr": 0.001},
                "checkpoint": {"every_epoch": False, "keep_last": 1},
            },
            "strategy": {"kind": "ring"},
            "cluster": {"num_workers": WORKERS, "cpus_per_worker": threads},
            "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
            "storage": {"path": storage},
        }
    )


@dataclass(frozen=True)
class Probe:
    """One probe job and what the ranks run it under.

    Attributes:
        name: The probe's name (keys its figures `"<name>/<family>"`).
        job: The job (`JobSpec.model_dump(mode="json")`, 2 workers).
        strategies: By family, the strategy section it runs under.
        steps: Measured steps per round (after `loopcal.WARMUP_STEPS`).
        batch: Global batch of a step (each rank takes half).
    """

    name: str
    job: dict[str, Any]
    strategies: dict[str, dict[str, Any]]
    steps: int
    batch: int


def mlp_probes(threads: int) -> list[Probe]:
    """The probe MLPs of `PROBE_MODELS`, each under the families probed on it."""
    return [
        Probe(
            name,
            probe_job(threads, name).model_dump(mode="json"),
            {f: s for f, (_, s) in PROBES.items() if name in probes_of(f)},
            MAX_STEPS,
            WORKERS * PROBE_MICRO_BATCH,
        )
        for name in PROBE_MODELS
    ]


def measure_rank(rank: int, threads: int, shards: Any, probes: list[Probe]) -> dict[str, float]:
    """In rank `rank` of the probes' group: seconds per step of each probe under each of its
    families (median of `ROUNDS` builds), keyed `"<probe>/<family>"`; `shards` is the ps
    manager's address."""
    from roundhouse.parallel.context import WorkerContext
    from roundhouse.parallel.ps.manager import connect_store
    from roundhouse.planner.loopcal import calibration_job, time_pieces
    from roundhouse.runs.rundir import run_dir_of
    from roundhouse.trainer.run import build_trainer
    from roundhouse.weights.checkpoint import Checkpointer

    base = WorkerContext(rank=rank, world_size=WORKERS, local_rank=rank, local_world_size=WORKERS)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in PROBES:  # pipeline last: it leaves DeepSpeed's global model-parallel
            for probe in probes:  # state set for later engines
                if family not in probe.strategies:
                    continue
                job, strategy = validate_job(probe.job, "probe"), probe.strategies[family]
                for _ in range(ROUNDS):
                    ctx = base
                    if family == "ps":
                        store = connect_store(shards, strategy.get("num_servers", 1))
                        ctx = WorkerContext(**{**base.__dict__, "parameter_store": store})
                    spec = calibration_job(job, tmp, probe.batch, strategy, WORKERS)
                    checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
                    torch.manual_seed(spec.trainer.seed)
                    trainer = build_trainer(spec, ctx, checkpointer, None)
                    try:
                        pieces = time_pieces(trainer, math.inf, max_steps=probe.steps)
                    finally:
                        trainer.strategy.close()
                        trainer.tracker.close()
                    samples.setdefault(f"{probe.name}/{family}", []).append(sum(pieces.values()))
    return {key: statistics.median(times) for key, times in samples.items()}


def _rank(rank: int, port: int, threads: int, shards: Any, probes: list, queue: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)  # the engines' banners; failures still reach the parent
    warnings.simplefilter("ignore")  # torch's deprecations inside DeepSpeed, in every rank
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS
    )
    try:
        figures = measure_rank(rank, threads, shards, probes)
        if rank == 0:
            queue.put(("ok", figures))
    except BaseException as exc:  # the parent re-raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def measure_families(threads: int, probes: list[Probe]) -> dict[str, float]:
    """`measure_rank` on two spawned gloo ranks (and a ps shard process); rank 0's figures."""
    from roundhouse.parallel.net import free_port
    from roundhouse.parallel.ps.manager import shard_manager

    port = free_port()
    with shard_manager() as shards:
        args = [(r, port, threads, shards, probes) for r in range(WORKERS)]
        return run_spawned(_rank, args, TIMEOUT_S, "exchange calibration")


def measure_residuals(threads: int, plan_probe: Callable[[JobSpec, int], Any]) -> dict[str, float]:
    """Per family, `<family>/fixed`, `<family>/per_module` and (wide-probed families)
    `<family>/per_param` seconds per step (module doc)."""
    measured = measure_families(threads, mlp_probes(threads))
    residual: dict[str, float] = {}  # "<probe>/<family>": measured - predicted
    size: dict[str, tuple[int, int]] = {}  # probe: (modules with parameters, parameters)
    for probe in PROBE_MODELS:
        plan = plan_probe(probe_job(threads, probe), WORKERS)
        predicted = {row.candidate.label: row.step_s for row in plan.rows}
        size[probe] = (plan.profile.param_modules, plan.profile.num_params)
        for family, (label, _) in PROBES.items():
            if probe in probes_of(family):
                residual[f"{probe}/{family}"] = measured[f"{probe}/{family}"] - predicted[label]
    fitted: dict[str, float] = {}
    (m1, _), (m2, _) = size["shallow"], size["deep"]
    for family in PROBES:
        r1, r2 = residual[f"shallow/{family}"], residual[f"deep/{family}"]
        per_module = max((r2 - r1) / (m2 - m1), 0.0)
        fixed = max(r1 - per_module * m1, 0.0)
        fitted[f"{family}/per_module"], fitted[f"{family}/fixed"] = per_module, fixed
        if "wide" in probes_of(family):
            modules, params = size["wide"]
            rest = residual[f"wide/{family}"] - fixed - per_module * modules
            fitted[f"{family}/per_param"] = max(rest / params, 0.0)
    logger.info("exchange residuals at %d ranks: %s", WORKERS, fitted)
    return fitted


def local_residuals(threads: int, plan_probe: Callable[[JobSpec, int], Any]) -> dict[str, float]:
    """This machine's residuals at `threads` threads per rank (measured once, then cached);
    none, with a warning, where the probe fails (DeepSpeed missing, no loopback port, ...)."""
    from roundhouse.planner.calibrate import cached

    probes = "+".join(f"{f}:{','.join(probes_of(f))}" for f in PROBES)  # new probes: re-probe
    key = f"cpu/threads{threads}/exchange{WORKERS}/{probes}"
    try:
        return cached(key, lambda: measure_residuals(threads, plan_probe))
    except RuntimeError as exc:  # a refinement: plan on the link model alone (not cached)
        logger.warning("exchange probe failed, planning without residuals: %s", exc)
        return {}


def job_probe(job: JobSpec, plan_probe: Callable[[JobSpec, int], Any]) -> tuple[Probe, dict]:
    """`job` itself as a probe at 2 workers (one micro-batch of its size at 2 workers per
    rank), and each family's predicted seconds per step there (families without a 2-worker
    row, such as pipeline for a model without pipeline layers, are left out). Raises
    `ValueError` where the job cannot be split over 2 ranks or its probe steps would take
    longer than `JOB_PROBE_BUDGET_S`."""
    batch = job.data.batch_size // job.trainer.grad_accum_steps
    if batch < WORKERS:
        raise ValueError(f"a step of {batch} sample(s) cannot be split over {WORKERS} ranks")
    spec = calibration_job(job, ".", batch, {"kind": "ring"}, WORKERS)
    rows = {r.candidate.label: r.step_s for r in plan_probe(spec, WORKERS).rows}
    predicted = {f: rows[label] for f, (label, _) in PROBES.items() if label in rows}
    steps = int(JOB_PROBE_BUDGET_S / (ROUNDS * sum(predicted.values()))) - WARMUP_STEPS
    if not predicted or steps < JOB_MIN_STEPS:
        raise ValueError(f"its probe would take over {JOB_PROBE_BUDGET_S:.0f} s")
    strategy = job.strategy  # the job's own ps shards and ring buckets, where it sets them
    settings = {
        "ps": {"num_servers": getattr(strategy, "num_servers", 1)},
        "ring": {"bucket_mb": getattr(strategy, "bucket_mb", 25.0)},
    }
    strategies = {f: {**PROBES[f][1], **settings.get(f, {})} for f in predicted}
    probe = Probe("job", spec.model_dump(mode="json"), strategies, min(steps, MAX_STEPS), batch)
    return probe, predicted


def job_residuals(
    job: JobSpec, threads: int, plan_probe: Callable[[JobSpec, int], Any]
) -> dict[str, float]:
    """Per family, `<family>/step`: what `job`'s own step costs at 2 ranks beyond the plan
    without residuals (`measured - predicted`, either sign), measured once and cached; empty
    where the job is too slow to probe (see `job_probe`: the MLPs' fit applies) or the probe
    fails."""
    from roundhouse.planner.calibrate import cached

    try:
        probe, predicted = job_probe(job, plan_probe)
    except ValueError as exc:
        logger.info("exchange probe on the MLPs, not the job: %s", exc)
        return {}
    strategies = ",".join(f"{f}:{sorted(s.items())}" for f, s in probe.strategies.items())
    key = f"cpu/threads{threads}/jobexchange{WORKERS}/{job_key(job)}/{probe.batch}/{strategies}"

    def measure() -> dict[str, float]:
        measured = measure_families(threads, [probe])
        return {f"{f}/step": measured[f"job/{f}"] - predicted[f] for f in predicted}

    try:
        return cached(key, measure)
    except RuntimeError as exc:  # a refinement: plan on the MLPs' fit (not cached)
        logger.warning("exchange probe of the job failed, using the probe MLPs': %s", exc)
        return {}
