"""What each strategy's own exchange path costs per step beyond the link model (cached).

The link model (`linkcal.py`) prices a collective as an idle gloo all-reduce: `latency +
bytes / bandwidth`. A strategy's real exchange on a CPU pays more per step than its bytes and
calls: ring's hand-offs to its communication thread, DeepSpeed's bucket bookkeeping and CPU
collectives, the parameter server's calls and its serial optimizer step in another process,
the pipeline schedule's per-step messages. Part of it is per step, part per module that owns
parameters (gradient hooks, ZeRO-3's gathers), and for the parameter server part per parameter
(its bytes go through the servers' transport, not gloo, and the server sums and steps them
alone). `local_residuals` measures them once per machine on small probe jobs, MLPs on digits
with 1 and with 8 hidden layers of 64 (ps also one of 2 x 2048, 4.3M parameters), 8 samples
per rank:

1. two spawned gloo ranks (`cpus_per_worker` threads each) train each probe through
   roundhouse's loop pieces (`loopcal.time_pieces`) under ring, ps (sync, one server shard in a
   manager process, `parallel/ps/manager.py`), ZeRO-2, ZeRO-3 and 2 pipeline stages: the
   measured seconds per step;
2. the plan of the same probe at 2 workers, without residuals, predicts each row;
3. a family's residual, `measured - predicted`, is fitted as `fixed + per_module x modules`
   (both at least 0) through the two narrow probes, and for ps `+ per_param x parameters`
   through the wide one.

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
from collections.abc import Callable
from typing import Any

import torch

from roundhouse.config import JobSpec
from roundhouse.planner.calibrate import run_spawned
from roundhouse.planner.costs import WORKERS_PROBED

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


def probes_of(family: str) -> list[str]:
    """The probe models `family` is measured on."""
    return [name for name in PROBE_MODELS if name != "wide" or family in WIDE_FAMILIES]


def probe_job(threads: int, probe: str, storage: str = ".") -> JobSpec:
    """A probe job: the MLP `probe` of `PROBE_MODELS`, 2 workers of `threads` CPUs each."""
    return JobSpec.model_validate(
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


def measure_rank(rank: int, threads: int, shards: Any) -> dict[str, float]:
    """In rank `rank` of the probes' group: seconds per step of each probe model and family,
    keyed `"<probe>/<family>"` (see the module doc); `shards` is the ps manager's address."""
    from roundhouse.parallel.context import WorkerContext
    from roundhouse.parallel.ps.manager import connect_store
    from roundhouse.planner.loopcal import calibration_job, time_pieces
    from roundhouse.runs.rundir import run_dir_of
    from roundhouse.trainer.checkpoint import Checkpointer
    from roundhouse.trainer.run import build_trainer

    base = WorkerContext(rank=rank, world_size=WORKERS, local_rank=rank, local_world_size=WORKERS)
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, (_, strategy) in PROBES.items():  # pipeline last: it leaves DeepSpeed's
            for probe in probes_of(family):  # global model-parallel state set for later engines
                job = probe_job(threads, probe, tmp)
                for _ in range(ROUNDS):
                    ctx = base
                    if family == "ps":
                        store = connect_store(shards, 1)
                        ctx = WorkerContext(**{**base.__dict__, "parameter_store": store})
                    spec = calibration_job(job, tmp, job.data.batch_size, strategy, WORKERS)
                    checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
                    torch.manual_seed(spec.trainer.seed)
                    trainer = build_trainer(spec, ctx, checkpointer, None)
                    try:
                        step = sum(time_pieces(trainer, math.inf).values())
                    finally:
                        trainer.strategy.close()
                        trainer.tracker.close()
                    samples.setdefault(f"{probe}/{family}", []).append(step)
    return {key: statistics.median(times) for key, times in samples.items()}


def _rank(rank: int, port: int, threads: int, shards: Any, queue: Any) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)  # the engines' banners; failures still reach the parent
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORKERS
    )
    try:
        figures = measure_rank(rank, threads, shards)
        if rank == 0:
            queue.put(("ok", figures))
    except BaseException as exc:  # the parent re-raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def measure_families(threads: int) -> dict[str, float]:
    """`measure_rank` on two spawned gloo ranks (and a ps shard process); rank 0's figures."""
    from roundhouse.parallel.net import free_port
    from roundhouse.parallel.ps.manager import shard_manager

    port = free_port()
    with shard_manager() as shards:
        args = [(r, port, threads, shards) for r in range(WORKERS)]
        return run_spawned(_rank, args, TIMEOUT_S, "exchange calibration")


def measure_residuals(threads: int, plan_probe: Callable[[JobSpec, int], Any]) -> dict[str, float]:
    """Per family, `<family>/fixed`, `<family>/per_module` and (wide-probed families)
    `<family>/per_param` seconds per step (module doc)."""
    measured = measure_families(threads)
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
