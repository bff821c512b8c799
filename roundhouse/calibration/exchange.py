"""What each strategy's own exchange path costs per step beyond the link model (cached).

The link model (`link.py`) prices a collective as an idle gloo all-reduce: `latency +
bytes / bandwidth`. A strategy's real exchange on a CPU pays more per step than its bytes and
calls: ring's hand-offs to its communication thread, DeepSpeed's bucket bookkeeping and CPU
collectives, the parameter server's calls and its serial optimizer step in another process,
the pipeline schedule's per-step messages. Part of it is per step, part per module that owns
parameters (gradient hooks, ZeRO-3's gathers), and for the parameter server part per parameter
(its bytes go through the servers' transport, not gloo, and the server sums and steps them
alone). Two probes measure them, once per machine, through `measure_families`:

1. two spawned gloo ranks (`cpus_per_worker` threads each, `ranks.run_ranks`) train a probe
   job through roundhouse's loop pieces (`loop.time_pieces`) under every registered cost
   model's probe families (`CostModel.probes`: ring; ps, sync, its server shards hosted by
   `Strategy.local_services` in a manager process; ZeRO-2, ZeRO-3 and 2 pipeline stages),
   each built `ROUNDS` times: the median of each build's median whole step (a step's
   pieces are skewed: their medians add up to less);
2. the plan of the same probe at 2 workers, without residuals, predicts each row;
3. `measured - predicted` is the family's residual at 2 ranks.

`job_residuals` probes the job itself (one step of its batch over the 2 ranks, its ps shards
and ring buckets; up to `JOB_MAX_STEPS` steps in each of `JOB_ROUNDS` builds where they fit,
as a millisecond step's median moves 15-25% between builds) when its predicted probe steps
fit `JOB_PROBE_BUDGET_S` (each build also stops once it measured its share of that budget:
a family's real step can be several times its predicted one): `<family>/step`,
kept only where positive (`CostModel.probed_step_s`). `local_residuals`, for a job too slow
for that, probes MLPs on digits with 1 and with 8 hidden layers of 64 (ps also one of 2 x 2048, 4.3M
parameters), 8 samples per rank, and fits each family's residual as `fixed + per_module x
modules` (both at least 0) through the two narrow probes, and for ps `+ per_param x
parameters` through the wide one.

`planner.costs.residual_s` adds it to a row of that family on this machine's CPU, scaled by the
row's cost model (`CostModel.residual_s`: the ring's `N - 1` steps; ps: its `N` pushers, which
the server serves one after another; a pipeline: its stage boundaries and micro-batches). The ps
probe's transport is a `multiprocessing` manager, not Ray's actor calls, which a job uses: the
same server code and process layout, a different RPC cost. Accelerator targets and
`--bandwidth` plans (a cluster you are not on) use no residuals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from roundhouse.calibration.cache import cached
from roundhouse.calibration.loop import MAX_STEPS, WARMUP_STEPS, calibration_job, job_key
from roundhouse.calibration.ranks import run_ranks
from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.parallel.costs import WORKERS_PROBED, JobShape
from roundhouse.parallel.registry import REFERENCE_SECTION, cost_models, strategy_class_for

logger = logging.getLogger(__name__)

TIMEOUT_S = 300
PROBE_MICRO_BATCH = 8
WORKERS = WORKERS_PROBED
ROUNDS = 3  # each family is built and measured this many times; the median is kept
# The probe MLPs' hidden layers: 2 and 9 modules with parameters (5K and 34K parameters), and
# 4.3M parameters in 3 modules, for the families whose bytes cost more than the link's.
PROBE_MODELS: dict[str, list[int]] = {"shallow": [64], "deep": [64] * 8, "wide": [2048, 2048]}
# The job itself is the probe when its probe steps are predicted to take at most this long.
JOB_PROBE_BUDGET_S = 40.0
JOB_MIN_STEPS = 3  # measured steps per round of the job's own probe, at least
# ... and at most, in more builds where the budget has room for them: a millisecond step's
# median moves 15-25% from one build to the next
JOB_MAX_STEPS, JOB_ROUNDS = 40, 7
# What a probe measures: a new value re-probes (2: the median whole step, not summed pieces)
MEASURE_VERSION = 2


def families() -> dict[str, tuple[str, dict[str, Any]]]:
    """Every registered cost model's probe families: family -> (the plan row that predicts
    it, the strategy section it runs), in registry order."""
    return {f: probe for costs in cost_models() for f, probe in costs.probes.items()}


def wide_families() -> set[str]:
    """Families whose bytes go through their own transport (probed on the wide MLP too)."""
    return {f for costs in cost_models() for f in costs.wide_probes}


def probes_of(family: str) -> list[str]:
    """The probe models `family` is measured on."""
    return [name for name in PROBE_MODELS if name != "wide" or family in wide_families()]


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
            "strategy": REFERENCE_SECTION,
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
        steps: Measured steps per round (after `loop.WARMUP_STEPS`).
        batch: Global batch of a step (each rank takes half).
        rounds: Builds per family; the median of their step medians is kept.
        budget_s: Measured seconds per build at most (at least `loop.MIN_STEPS` steps): the
            job's own probe is sized by its predicted steps, which can be far too short.
    """

    name: str
    job: dict[str, Any]
    strategies: dict[str, dict[str, Any]]
    steps: int
    batch: int
    rounds: int = ROUNDS
    budget_s: float = math.inf


def mlp_probes(threads: int) -> list[Probe]:
    """The probe MLPs of `PROBE_MODELS`, each under the families probed on it."""
    return [
        Probe(
            name,
            probe_job(threads, name).model_dump(mode="json"),
            {f: s for f, (_, s) in families().items() if name in probes_of(f)},
            MAX_STEPS,
            WORKERS * PROBE_MICRO_BATCH,
        )
        for name in PROBE_MODELS
    ]


def measure_rank(rank: int, hosts: dict[type, Any], probes: list[Probe]) -> dict[str, float]:
    """In rank `rank` of the probes' group: seconds per step of each probe under each of its
    families (median of `probe.rounds` builds), keyed `"<probe>/<family>"`; `hosts` holds, by
    strategy class, the address of its local services (`Strategy.local_services`)."""
    from roundhouse.calibration.loop import time_pieces
    from roundhouse.parallel.context import WorkerContext
    from roundhouse.parallel.registry import get_strategy_class
    from roundhouse.runs.rundir import run_dir_of
    from roundhouse.trainer.run import build_trainer
    from roundhouse.weights.checkpoint import Checkpointer

    base = WorkerContext(rank=rank, world_size=WORKERS, local_rank=rank, local_world_size=WORKERS)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families():  # in registry order (a cost model orders its own: a
            for probe in probes:  # pipeline last, it leaves DeepSpeed's global state set)
                if family not in probe.strategies:
                    continue
                job, strategy = (
                    validate_job(probe.job, source="exchange probe"),
                    probe.strategies[family],
                )
                for _ in range(probe.rounds):
                    spec = calibration_job(job, tmp, probe.batch, strategy, WORKERS)
                    runs = get_strategy_class(spec.strategy)
                    ctx = runs.attach_local_services(base, hosts.get(runs), spec.strategy)
                    checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
                    torch.manual_seed(spec.trainer.seed)
                    trainer = build_trainer(spec, ctx, checkpointer, None)
                    try:
                        pieces = time_pieces(trainer, probe.budget_s, max_steps=probe.steps)
                    finally:
                        trainer.strategy.close()
                        trainer.tracker.close()
                    samples.setdefault(f"{probe.name}/{family}", []).append(pieces["step_s"])
    return {key: statistics.median(times) for key, times in samples.items()}


def measure_families(threads: int, probes: list[Probe]) -> dict[str, float]:
    """`measure_rank` on two spawned gloo ranks (with each probed strategy's services hosted
    locally, `Strategy.local_services`); rank 0's figures."""
    with contextlib.ExitStack() as stack:
        hosts = {}
        for probe in probes:
            for section in probe.strategies.values():
                runs = strategy_class_for(section)
                if runs not in hosts:
                    hosts[runs] = stack.enter_context(runs.local_services())
        return run_ranks(
            measure_rank,
            (hosts, probes),
            world_size=WORKERS,
            threads=threads,
            timeout_s=TIMEOUT_S,
            what="exchange calibration",
        )


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
        for family, (label, _) in families().items():
            if probe in probes_of(family):
                residual[f"{probe}/{family}"] = measured[f"{probe}/{family}"] - predicted[label]
    fitted: dict[str, float] = {}
    (m1, _), (m2, _) = size["shallow"], size["deep"]
    for family in families():
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
    probes = "+".join(f"{f}:{','.join(probes_of(f))}" for f in families())  # new probes: re-probe
    key = f"cpu/threads{threads}/exchange{WORKERS}/v{MEASURE_VERSION}/{probes}"
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
    spec = calibration_job(job, ".", batch, REFERENCE_SECTION, WORKERS)
    rows = {r.candidate.label: r.step_s for r in plan_probe(spec, WORKERS).rows}
    predicted = {f: rows[label] for f, (label, _) in families().items() if label in rows}
    if not predicted:
        raise ValueError("no probed family has a row for it at 2 workers")
    for rounds in (JOB_ROUNDS, ROUNDS):  # more builds where all of them fit the budget
        steps = int(JOB_PROBE_BUDGET_S / (rounds * sum(predicted.values()))) - WARMUP_STEPS
        if steps >= JOB_MAX_STEPS:
            break
    if steps < JOB_MIN_STEPS:
        raise ValueError(f"its probe would take over {JOB_PROBE_BUDGET_S:.0f} s")
    # the job's own settings (its ps shards, its ring buckets), where its section has them
    shape = JobShape(batch, 1, 0, settings=job.strategy.model_dump(mode="json"))
    sections = {f: s for costs in cost_models() for f, s in costs.probe_sections(shape).items()}
    strategies = {f: sections[f] for f in predicted}
    steps = min(steps, JOB_MAX_STEPS)
    # Each build measures for its share of the budget at most: a family's real step can be
    # several times the predicted one (its residual is what the probe measures).
    budget_s = JOB_PROBE_BUDGET_S / (rounds * len(strategies))
    probe = Probe("job", spec.model_dump(mode="json"), strategies, steps, batch, rounds, budget_s)
    return probe, predicted


def job_residuals(
    job: JobSpec, threads: int, plan_probe: Callable[[JobSpec, int], Any]
) -> dict[str, float]:
    """Per family, `<family>/step`: what `job`'s own step costs at 2 ranks beyond the plan
    without residuals (`measured - predicted`, either sign), measured once and cached; empty
    where the job is too slow to probe (see `job_probe`: the MLPs' fit applies) or the probe
    fails."""
    try:
        probe, predicted = job_probe(job, plan_probe)
    except ValueError as exc:
        logger.info("exchange probe on the MLPs, not the job: %s", exc)
        return {}
    strategies = ",".join(f"{f}:{sorted(s.items())}" for f, s in probe.strategies.items())
    key = (
        f"cpu/threads{threads}/jobexchange{WORKERS}/v{MEASURE_VERSION}/{job_key(job)}/"
        f"{probe.batch}/{strategies}"
    )

    def measure() -> dict[str, float]:
        measured = measure_families(threads, [probe])
        return {f"{f}/step": measured[f"job/{f}"] - predicted[f] for f in predicted}

    try:
        return cached(key, measure)
    except RuntimeError as exc:  # a refinement: plan on the MLPs' fit (not cached)
        logger.warning("exchange probe of the job failed, using the probe MLPs': %s", exc)
        return {}
