"""How close `roundhouse plan` comes to what runs on this machine.

1. Step time: for one model of each family in the zoo (`mlp`: mlp:small on digits; `cnn`: the
   quickstart's resnet:debug; `rnn`: lstm_lm:small on pytext; `gpt_small`; `moe`: moe:debug
   on pytext), each of single (1 worker), ring, ps (sync), DeepSpeed ZeRO-2, ZeRO-3 and 2
   pipeline stages (2 workers) that the plan lists for the model trains a few steps through
   the real `run_worker` on gloo processes (1 thread each, as a `cpus_per_worker: 1` Ray
   worker), and the median time between logged steps (the first two dropped) is compared with
   the plan's `step s` for that row. For the MLP, the CNN, the LSTM and the MoE (steps of
   milliseconds, or 12 steps a run) 5, 3, 3 and 5 rounds each calibrate the model afresh and
   measure one run of every row, and each side's median over the rounds is compared (the
   machine's speed drifts from minute to minute: both sides sample the same minutes).
   `RESULT step_<model>_<strategy> ours=<predicted s> baseline=<measured s>`; each round's pair
   goes to stderr as a `# <model> round <n>: ...` line.
   With `--ray`, the 2-worker ring, ps and ZeRO-2 rows also train under `roundhouse train` on
   the embedded Ray cluster, and the plan's samples/s is compared with the run's logged
   `train/samples_per_s` (median over the steps logged 10 s or more after the first: the
   first seconds share the cores with Ray's own start-up, a one-off the plan's steady-state
   figure leaves out; the run is lengthened by 20 s of the plan's steps for it), in the first
   `RAY_RUNS` (3) of those rounds, right after that round's run of the row; each side's
   median is compared.
   `RESULT ray_<model>_<strategy> ours=<predicted samples/s> baseline=<measured samples/s>`.
2. Peak memory: one process trains two steps of each model under torch.profiler's memory
   accounting; the peak of live CPU memory (parameters built before, plus the profiler's
   allocation events) is compared with the plan's `single` row total.
   `RESULT peak_mem_<model> ours=<predicted MB> baseline=<measured MB>`.
3. Model states against DeepSpeed's own estimators (bf16 + Adam, 8 GPUs, no offload) for
   gpt:1.3b: `RESULT ds_zero2_states ...`, `RESULT ds_zero3_states ...`.
4. Planning speed: `roundhouse plan` of gpt:1.3b over 1-64 H100s, wall time of the command
   against the 30 s target.

    python benchmarks/plan_accuracy.py [--steps N] [--models mlp cnn rnn gpt_small moe] [--ray]
    python benchmarks/plan_accuracy.py --quick   # mlp, single and ring, 6 steps: a smoke run

The machine is shared: step times move with other load; both sides of a ratio come from the
same minutes: each run calibrates afresh into a temporary `ROUNDHOUSE_CACHE_DIR` (the model's
step, the link and the exchange probe), unless that variable is set, and each round above
measures the model's step and exchange probe again. The ps runs host the
job's `num_servers` shards in a `multiprocessing` manager (`parallel/ps/manager.py`), the
transport of the plan's ps probe; a job on Ray calls actors instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roundhouse.calibration.cache import cache_path
from roundhouse.config.loading import validate_job
from roundhouse.parallel.deepspeed.zero_memory import zero_states
from roundhouse.parallel.registry import get_strategy_class
from roundhouse.planner import build_plan
from roundhouse.planner.target import JobModel
from roundhouse.trainer import run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_ring_training import node_context
from tests.helpers.dist import run_distributed

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900
# Steps per measured run: enough gaps for a stable median. The MLP's 2-rank steps take 2-20 ms
# (median 4-10), so 40 of them left its median 15-25% apart between two runs.
DEFAULT_STEPS = {"mlp": 200, "cnn": 60, "rnn": 12, "gpt_small": 8, "moe": 60}
# Rounds of a fresh calibration and one run per row (fresh processes; each side's median is
# kept): a millisecond step's median also moves 15-25% from one pair of processes to the next.
RUNS = {"mlp": 5, "cnn": 3, "rnn": 3, "gpt_small": 1, "moe": 5}
RAY_ROWS = ("ring", "ps", "zero2")  # the 2-worker rows also run under `roundhouse train`
RAY_RUNS = 3  # rounds with a Ray run of each of those rows, at most (each about 40 s)
# A Ray run's first seconds of training share the 2 cores with Ray's own start-up (idle worker
# processes it starts ahead, Ray Train's helper actors: 0.5-0.9 of a core for ~8 s), a one-off
# cost outside the plan's steady-state samples/s. Steps logged in them are not measured, and
# the run trains `RAY_MEASURED_S` more seconds (by the plan's step time) after them.
RAY_SETTLE_S = 10.0
RAY_MEASURED_S = 10.0


def pytext(batch: int, seq_len: int = 64) -> dict[str, Any]:
    """The data section of a language model on the built-in text."""
    return {
        "source": "builtin:pytext",
        "batch_size": batch,
        "options": {"seq_len": seq_len, "max_bytes": 300000},
    }


# Per family: the model section, the data section and the optimizer. Pipeline stages cannot
# share gpt's tied embedding: it is untied for every strategy.
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "mlp": (
        {"name": "mlp", "flavor": "small"},
        {"source": "builtin:digits", "batch_size": 64},
        {"name": "adam", "lr": 0.003},
    ),
    "cnn": (
        {"name": "resnet", "flavor": "debug"},
        {"source": "builtin:digits", "batch_size": 64},
        {"name": "adam", "lr": 0.003},
    ),
    "rnn": ({"name": "lstm_lm", "flavor": "small"}, pytext(16), {"name": "adam", "lr": 0.002}),
    "gpt_small": (
        {"name": "gpt", "flavor": "small", "options": {"tie_weights": False}},
        pytext(8),
        {"name": "adamw", "lr": 0.001},
    ),
    "moe": ({"name": "moe", "flavor": "debug"}, pytext(8), {"name": "adamw", "lr": 0.001}),
}
STRATEGIES: list[tuple[str, int, dict[str, Any]]] = [
    ("single", 1, {"kind": "single"}),
    ("ring", 2, {"kind": "ring"}),
    ("ps", 2, {"kind": "ps", "mode": "sync"}),
    ("zero2", 2, {"kind": "deepspeed", "zero_stage": 2}),
    ("zero3", 2, {"kind": "deepspeed", "zero_stage": 3}),
    ("pipeline2", 2, {"kind": "deepspeed", "zero_stage": 1, "pipeline_stages": 2}),
]


def model_job(model: str, storage: Path, steps: int) -> dict[str, Any]:
    """The job each strategy runs: only `strategy` and the run id change."""
    section, data, optimizer = FAMILIES[model]
    return {
        "name": f"plan_{model}",
        "model": section,
        "data": data,
        "trainer": {
            "max_steps": steps,
            "log_every_steps": 1,
            "device": "cpu",
            "optimizer": optimizer,
            "checkpoint": {"every_epoch": False, "keep_last": 1},
        },
        "cluster": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage)},
    }


def train_rank(rank: int, world_size: int, job: dict, address: Any) -> None:
    spec = validate_job(job)
    ctx = node_context(rank, world_size, world_size)
    # the strategy's services (ps: as many shards as planned), hosted on this machine
    ctx = get_strategy_class(spec.strategy).attach_local_services(ctx, address, spec.strategy)
    run_worker(spec, ctx)


def measure_step(job: dict[str, Any], workers: int) -> float:
    """Median seconds between logged steps of a real run (first two steps dropped)."""
    prepared = prepare_run(validate_job(job))
    dumped = prepared.job.model_dump(mode="json")
    with get_strategy_class(prepared.job.strategy).local_services() as address:
        run_distributed(train_rank, workers, TIMEOUT_S, dumped, address)
    lines = (Path(prepared.run_dir.url) / "metrics.jsonl").read_text().splitlines()
    times = [r["time"] for r in map(json.loads, lines) if "train/loss" in r]
    gaps = [b - a for a, b in itertools.pairwise(times[2:])]
    return statistics.median(gaps)


def measured_peak(job: dict[str, Any]) -> float:
    """Peak live CPU bytes of two training steps, by torch.profiler's memory accounting (its
    memory timeline: tensors alive before the profile, then every allocation and free)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    from roundhouse.trainer.optim import build_optimizer

    spec = validate_job({**job, "strategy": {"kind": "single"}})
    jm = JobModel(spec)
    torch.manual_seed(0)
    model = jm.build()
    optimizer = build_optimizer(model.parameters(), config=spec.trainer.optimizer)
    batch = jm.batch(spec.data.batch_size, "cpu")
    kwargs = {"profile_memory": True, "record_shapes": True, "with_stack": True}
    with profile(activities=[ProfilerActivity.CPU], **kwargs) as prof:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            loss = jm.task.loss(jm.task.forward(model, batch), batch)
            loss.backward()
            optimizer.step()
            del loss
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def result(name: str, ours: float, baseline: float, unit: str) -> None:
    print(
        f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} "
        f"ratio={ours / baseline:.3f} unit={unit}",
        flush=True,
    )


def forget_step_calibration() -> None:
    """Drop the cached step calibrations, the model's step and the job's exchange probe (the
    link's stays): the next plan measures them again."""
    path = cache_path()
    if path.exists():
        table = json.loads(path.read_text())
        kept = {k: v for k, v in table.items() if "/loop/" not in k and "/jobexchange" not in k}
        path.write_text(json.dumps(kept))


def predicted_rows(job: dict[str, Any]) -> dict[tuple[str, int], Any]:
    plan = build_plan(validate_job({**job, "strategy": {"kind": "ring"}}), [1, 2], "cpu")
    return {(r.candidate.label, r.candidate.workers): r for r in plan.rows}


def step_results(
    model: str, steps: int, storage: Path, labels: tuple[str, ...] | None, on_ray: bool
) -> None:
    """Each strategy's predicted step time against its measured one, over `RUNS[model]`
    rounds: each round calibrates the model afresh (its step and its exchange probe) and then
    measures one run of every row, and each side's median over the rounds is compared. The
    shared machine's speed drifts from minute to minute, so both sides sample the same
    minutes. With `on_ray`, the first `RAY_RUNS` rounds also run the `RAY_ROWS` under
    `roundhouse train` (samples/s, the same way)."""
    job = model_job(model, storage, steps)
    predicted: dict[str, list[float]] = {}
    measured: dict[str, list[float]] = {}
    ray_predicted: dict[str, list[float]] = {}  # samples/s, `--ray`
    ray_measured: dict[str, list[float]] = {}
    rows: dict[tuple[str, int], Any] = {}
    for round_ in range(RUNS[model]):
        forget_step_calibration()
        rows = predicted_rows(job)
        if round_ == 0:
            single = rows[("single", 1)]
            peak = measured_peak(job)
            result(f"peak_mem_{model}", single.memory.total / 1e6, peak / 1e6, "MB")
        for label, workers, strategy in STRATEGIES:
            if labels and label not in labels:
                continue
            if (label, workers) not in rows:
                if round_ == 0:
                    print(f"# {model}: the plan has no {label} row on {workers}", file=sys.stderr)
                continue
            run_id = f"{label}-{round_}"
            run = {**job, "strategy": strategy, "storage": {"path": str(storage), "run_id": run_id}}
            predicted.setdefault(label, []).append(rows[(label, workers)].step_s)
            measured.setdefault(label, []).append(measure_step(run, workers))
            said = f"# {model} round {round_}: {label} step planned {predicted[label][-1]:.4g} s"
            said += f", measured {measured[label][-1]:.4g} s"
            if on_ray and label in RAY_ROWS and round_ < RAY_RUNS:
                speed = rows[(label, workers)].samples_per_s(job["data"]["batch_size"])
                ray_predicted.setdefault(label, []).append(speed)
                extra = math.ceil((RAY_SETTLE_S + RAY_MEASURED_S) / rows[(label, workers)].step_s)
                ray_run = {**run, "trainer": {**run["trainer"], "max_steps": steps + extra}}
                ray_measured.setdefault(label, []).append(ray_samples_per_s(ray_run, storage))
                said += f"; Ray samples/s {speed:.4g} vs {ray_measured[label][-1]:.4g}"
            print(said, file=sys.stderr)  # each round's pair: which side moved between rounds
    for label, _, _ in STRATEGIES:
        if label not in predicted:
            continue
        ours, theirs = statistics.median(predicted[label]), statistics.median(measured[label])
        result(f"step_{model}_{label}", ours, theirs, "s")
        if label in ray_predicted:
            ours, theirs = (
                statistics.median(ray_predicted[label]),
                statistics.median(ray_measured[label]),
            )
            result(f"ray_{model}_{label}", ours, theirs, "samples/s")


def ray_samples_per_s(job: dict[str, Any], storage: Path) -> float:
    """The median logged `train/samples_per_s` of `job` under `roundhouse train` on the embedded
    Ray cluster, over the steps logged `RAY_SETTLE_S` or more after the first (Ray's start-up
    is done by then), or all but the first two if fewer than 5 are left."""
    run_id = f"ray-{job['storage']['run_id']}"
    path = storage / f"{run_id}.yaml"
    path.write_text(json.dumps({**job, "storage": {"path": str(storage), "run_id": run_id}}))
    command = [sys.executable, "-m", "roundhouse.launch.cli", "train", str(path)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=TIMEOUT_S)
    lines = (storage / job["name"] / run_id / "metrics.jsonl").read_text().splitlines()
    logged = [r for r in map(json.loads, lines) if "train/samples_per_s" in r]
    settled = [r for r in logged if r["time"] >= logged[0]["time"] + RAY_SETTLE_S]
    rows = settled if len(settled) >= 5 else logged[2:] or logged
    return statistics.median(r["train/samples_per_s"] for r in rows)


def estimator_results() -> None:
    """Model states of gpt:1.3b on 8 GPUs (bf16, Adam) against DeepSpeed's estimators."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from roundhouse.planner.target import job_profile

    job = validate_job(
        {**model_job("gpt_small", Path("."), 1), "model": {"name": "gpt", "flavor": "1.3b"}}
    )
    p = job_profile(JobModel(job))
    for gpus in (8, 64):
        _, ds2 = estimate_zero2_model_states_mem_needs(p.num_params, gpus, 1, cpu_offload=False)
        ours2 = sum(
            zero_states(
                p.num_params, p.largest_layer_params, stage=2, dp=gpus, moments=2, bf16=True
            )[:3]
        )
        result(f"ds_zero2_states_gpt1.3b_{gpus}gpus", ours2 / 1e9, ds2 / 1e9, "GB")
        _, ds3, _ = estimate_zero3_model_states_mem_needs(
            p.num_params, p.largest_layer_params, gpus, 1, cpu_offload=False
        )
        ours3 = sum(
            zero_states(
                p.num_params, p.largest_layer_params, stage=3, dp=gpus, moments=2, bf16=True
            )[:3]
        )
        result(f"ds_zero3_states_gpt1.3b_{gpus}gpus", ours3 / 1e9, ds3 / 1e9, "GB")


def speed_result() -> None:
    """Wall time of the CLI planning gpt:1.3b over 1-64 H100s."""
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "roundhouse.launch.cli",
            "plan",
            "configs/gpt_deepspeed.yaml",
            "model.flavor=1.3b",
            "trainer.precision=bf16",
            "data.batch_size=512",
            "--workers",
            "1-64",
            "--device",
            "H100-80GB",
            "--json",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    result("plan_seconds_gpt1.3b_1-64xH100", time.perf_counter() - start, 30.0, "s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help=f"steps per run (default: {DEFAULT_STEPS})")
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--ray", action="store_true", help="also ring, ps, zero2 under Ray")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: mlp, single and ring, 6 steps"
    )
    parser.add_argument("--skip-steps", action="store_true", help="only estimators and speed")
    parser.add_argument("--skip-estimators", action="store_true", help="only the measured runs")
    args = parser.parse_args()
    labels = None
    if args.quick:
        args.models, args.steps, args.skip_estimators, labels = ["mlp"], 6, True, ("single", "ring")
    logging.basicConfig(level=logging.WARNING)
    if not args.skip_estimators:
        estimator_results()
        speed_result()
    if args.skip_steps:
        return
    with tempfile.TemporaryDirectory() as tmp:
        # Calibrate now, under the load the runs below will see (not from an older cache).
        os.environ.setdefault("ROUNDHOUSE_CACHE_DIR", str(Path(tmp) / "cache"))
        for model in args.models:
            steps = args.steps or DEFAULT_STEPS[model]
            step_results(model, steps, Path(tmp) / model, labels, args.ray)


if __name__ == "__main__":
    main()
