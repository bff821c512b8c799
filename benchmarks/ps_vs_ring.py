"""Parameter server vs ring all-reduce, and async/ssp vs sync with a straggler, on Ray.

One embedded Ray runtime (127.0.0.1) runs the same job (LeNet `debug` on digits resized to
32x32, Adam, 2 workers of 1 CPU, `--epochs` epochs) with these strategies:

- `ring` and `ps` sync (1 server, no node aggregation: both workers share this one machine,
  and aggregation would make them a single pusher);
- with rank 1 slowed by `--factor` (straggler injection, `strategy.slow_worker`): `ps` sync,
  async and ssp (staleness 2).

Throughput is the job's: the training samples of the epochs between the end of the first epoch
and the end of the last (both synchronised by the loop's validation), over the wall time
between those two validation rows of metrics.jsonl. async and ssp use dynamic data assignment
(their default): the workers claim each epoch's batches from the servers as they go, so the
fast worker trains on more of each epoch instead of waiting for the straggler's share. With a
persistent straggler, ssp still holds the fast worker within `staleness` steps of the slow one,
so its throughput stays near sync's. The straggler's every step (data, compute, exchange) takes
`--factor` times as long, so with 2 workers async's ideal is (1 + 1/factor) / (2/factor), 1.5
for factor 2: the target sits exactly at the ideal. Accuracy is the final test accuracy.
Medians over `--repeats`.

The exchange floor: a sync step costs the workers one Ray actor call that carries the model's
gradients and returns its parameters. The benchmark times that call (an actor echoing an array
of the model's size) against an empty call, and prints each strategy's time per global step, so
a shortfall can be read against what Ray's object transfer costs on this machine.

    python benchmarks/ps_vs_ring.py [--epochs 5] [--factor 2] [--repeats 1] [--batch-size 64]

RESULT lines: `ps_sync_vs_ring` (target >= 0.8), `ps_async_vs_sync_slowed` and
`ps_ssp_vs_sync_slowed` (target >= 1.5), the accuracy of each slowed run, and
`ps_model_call_vs_empty_call` (ms per call; no target).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from roundhouse.cluster.runtime import ray_runtime
from roundhouse.cluster.services import RayServiceGroup, service_cpus
from roundhouse.cluster.workers import train_on_ray
from roundhouse.config import OptimizerConfig, SchedulerConfig
from roundhouse.config.loading import validate_job
from roundhouse.data import build_splits
from roundhouse.data.sampler import BatchPlan
from roundhouse.parallel.ps import ServerSetup, ShardServer
from roundhouse.parallel.ps.remote import RemoteParameterStore
from roundhouse.trainer.optim import build_optimizer, build_scheduler
from roundhouse.weights.model_build import build_model_with_data
from roundhouse.weights.run_folder import prepare_run

logger = logging.getLogger("ps_vs_ring")
ADAM = OptimizerConfig(name="adam", lr=0.002)

VARIANTS: dict[str, dict[str, Any]] = {
    "ring": {"kind": "ring"},
    "ps_sync": {"kind": "ps", "mode": "sync"},
    "ps_sync_slowed": {"kind": "ps", "mode": "sync", "slow": True},
    "ps_async_slowed": {"kind": "ps", "mode": "async", "slow": True},
    "ps_ssp_slowed": {"kind": "ps", "mode": "ssp", "staleness": 2, "slow": True},
}


def build_job(name: str, variant: dict[str, Any], args: argparse.Namespace, storage: str) -> Any:
    strategy = {k: v for k, v in variant.items() if k != "slow"}
    if strategy["kind"] == "ps":
        strategy.update(num_servers=1, node_aggregation=False, server_resources={"CPU": 1})
        if variant.get("slow"):
            strategy["slow_worker"] = {"rank": 1, "factor": args.factor}
    job = {
        "name": name,
        "model": {"name": "lenet", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": args.batch_size, "image_size": 32},
        "trainer": {
            "max_epochs": args.epochs,
            "log_every_steps": 5,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.002},
            "checkpoint": {"every_epoch": False},
        },
        "strategy": strategy,
        "cluster": {"num_workers": 2, "cpus_per_worker": 1},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": storage},
    }
    return validate_job(job)


def samples_per_epoch(job: Any) -> int:
    """Training samples in one epoch of `job` (every global step, the last one partial)."""
    n = len(build_splits(job.data, seed=job.trainer.seed).train)
    plan = BatchPlan(n, job.data.batch_size, job.cluster.num_workers, 1, job.data.drop_last)
    return sum(end - start for start, end in map(plan.step_bounds, range(plan.num_steps)))


def measure(job: Any) -> tuple[float, float]:
    """(job samples/s between the first and last epoch ends, final test accuracy)."""
    prepared = prepare_run(job)
    train_on_ray(prepared, resume=False)
    path = Path(prepared.run_dir.url) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ends = [r for r in rows if "val/loss" in r]
    first, last = ends[0], ends[-1]
    samples = (last["epoch"] - first["epoch"]) * samples_per_epoch(job)
    return samples / (last["time"] - first["time"]), rows[-1]["test/accuracy"]


class Echo:
    """An actor answering a call that carries an array with an array of the same size."""

    def echo(self, array: Any) -> Any:
        return array.copy()

    def empty(self) -> None:
        return None


def exchange_floor(job: Any, calls: int = 200) -> tuple[float, float, float]:
    """(ms per Ray actor call carrying the model's size both ways, ms per empty call, ms per
    ps step through `RemoteParameterStore`: one push of the model's gradient asking for the
    next step's parameters, and the pull collecting them, from a `ShardServer` actor that
    applies Adam; over the socket data path, or Ray calls where the code has none)."""
    import numpy as np
    import ray

    model, _ = build_model_with_data(job)
    flat = np.ones(sum(p.numel() for p in model.parameters()), dtype=np.float32)
    actor = ray.remote(Echo).options(num_cpus=0).remote()
    try:
        timings = [time_calls(lambda: ray.get(actor.echo.remote(flat)), calls)]
        timings.append(time_calls(lambda: ray.get(actor.empty.remote()), calls))
    finally:
        ray.kill(actor)
    server = ray.remote(ShardServer).options(num_cpus=0, max_concurrency=8).remote(0, 1)
    try:
        store = RemoteParameterStore(RayServiceGroup([server]))
        store.initialize(0, adam_setup(), [0], [flat], None, 0)
        clock = iter(range(10**6))

        def step() -> None:
            t = next(clock)
            store.push(0, 0, t, [0], flat, [True], 1, pull_step=t + 1)
            store.pull([0], 0, t + 1)

        timings.append(time_calls(step, calls))
    finally:
        ray.kill(server)
    return timings[0], timings[1], timings[2]


def adam_setup() -> ServerSetup:
    """One pusher, sync, the benchmark's Adam: a shard as the jobs' sync runs have it."""
    return ServerSetup(
        mode="sync",
        staleness=0,
        num_pushers=1,
        world_size=1,
        build_optimizer=functools.partial(build_optimizer, config=ADAM),
        build_scheduler=functools.partial(
            build_scheduler, config=SchedulerConfig(), steps_per_epoch=1, total_steps=10**6
        ),
    )


def time_calls(call: Any, calls: int) -> float:
    """ms per `call()`, after 5 warm-up calls."""
    for _ in range(5):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e3


def result(name: str, ours: float, baseline: float, unit: str) -> None:
    ratio = ours / baseline if baseline else float("nan")
    print(f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.3f} unit={unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument(
        "--only-sync", action="store_true", help="ring and ps sync only (no straggler runs)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    storage = tempfile.mkdtemp(prefix="ps_vs_ring-")
    chosen = {n: v for n, v in VARIANTS.items() if not (args.only_sync and v.get("slow"))}
    jobs = {name: build_job(name, v, args, storage) for name, v in chosen.items()}
    any_ps = next(j for j in jobs.values() if j.strategy.kind == "ps")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    with ray_runtime(any_ps.cluster, extra_cpus=service_cpus(any_ps)):
        for _ in range(args.repeats):
            for name, job in jobs.items():  # alternated, so every variant sees the same noise
                runs[name].append(measure(job))
                logger.info("%s: %.1f samples/s, test accuracy %.3f", name, *runs[name][-1])
        model_call, empty_call, wire_step = exchange_floor(any_ps)
    speed = {n: statistics.median(r[0] for r in rs) for n, rs in runs.items()}
    accuracy = {n: statistics.median(r[1] for r in rs) for n, rs in runs.items()}
    result("ps_sync_vs_ring", speed["ps_sync"], speed["ring"], "samples/s")
    for mode in () if args.only_sync else ("async", "ssp"):
        name, sync = f"ps_{mode}_slowed", "ps_sync_slowed"
        result(f"ps_{mode}_vs_sync_slowed", speed[name], speed[sync], "samples/s")
    for mode in () if args.only_sync else ("sync", "async", "ssp"):
        name = f"ps_{mode}_slowed"
        result(f"{name}_accuracy", accuracy[name], accuracy["ps_sync_slowed"], "accuracy")
    step_ms = {n: args.batch_size / s * 1e3 for n, s in speed.items()}
    logger.info("ms per global step: %s", ", ".join(f"{n} {ms:.1f}" for n, ms in step_ms.items()))
    result("ps_model_call_vs_empty_call", model_call, empty_call, "ms")
    result("ps_store_step_vs_model_call", wire_step, model_call, "ms")


if __name__ == "__main__":
    main()
