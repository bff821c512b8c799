"""Startup and per-step cost of `roundhouse train` on Ray, against bare Ray Train and `--local`.

(a) startup: the time from launching `roundhouse train JOB` (a subprocess, embedded cluster,
    2 workers, `max_steps=1`) to the end of the first optimizer step, against a bare
    `TorchTrainer` script (also a subprocess starting its own embedded Ray on 127.0.0.1 with
    the same CPUs) that builds the same MLP on the same digits data and takes one step. The
    end of the first step is a timestamp written by the worker (roundhouse: the `time` of the
    step-1 row of `metrics.jsonl`, logged right after the step; baseline: a file written right
    after `optimizer.step()`), relative to the wall-clock time just before the subprocess
    started.
(b) step rate: steps/s of the same job on 1 Ray worker (1 CPU) against `--local` in a process
    limited to 1 thread: the median of the `train/samples_per_s` windows each run logs (the
    first window, with warm-up, excluded). The ratio shows what running under Ray (the worker
    environment, the driver's progress channel) costs per step.

(c) `--warm`: startup on a warm cluster (one `ray start` cluster for every run): ours is
    `roundhouse train` with `cluster.address` and `recovery: live` (roundhouse's own Ray core
    actor group), the baseline the same bare `TorchTrainer` script connecting to that cluster.
    Two figures: `startup_warm`, ours starting fresh actors every run (`keep_warm_s: 0`), and
    `startup_warm_reused`, ours on the warm actors an earlier run left (`keep_warm_s > 0`; one
    unmeasured run first leaves them): the second run on a warm cluster. The baseline starts
    its workers anew every run, as Ray Train does.

Rounds alternate ours/baseline to share the machine's noise; medians are reported.

    python benchmarks/startup.py [--rounds 3] [--steps 3000]
    python benchmarks/startup.py --warm [--rounds 3]

Prints `RESULT startup ours=<s> baseline=<s> ratio=... unit=s` and
`RESULT ray_step_rate ours=<samples/s> baseline=<samples/s> ratio=... unit=samples/s`;
with `--warm`, `RESULT startup_warm ...` and `RESULT startup_warm_reused ...` (target: ratio
<= 0.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 200  # steps per samples/s window: an MLP step is ~0.2 ms, a 20-step window 4 ms

BASELINE = r"""
import sys, time
import ray, torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from sklearn.datasets import load_digits

OUT = sys.argv[1]

def train(config):
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    model = prepare_model(torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rank = ray.train.get_context().get_world_rank()
    xb, yb = x[rank * 16:(rank + 1) * 16], y[rank * 16:(rank + 1) * 16]
    loss = torch.nn.functional.cross_entropy(model(xb), yb)
    loss.backward()
    opt.step()
    if rank == 0:
        with open(config["out"], "w") as f:
            f.write(str(time.time()))

if len(sys.argv) > 3:  # a warm cluster's address, bound to 127.0.0.1
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False  # keep the loopback address (as roundhouse does)
    ray.init(address=sys.argv[3], logging_level="WARNING")
else:
    ray.init(_node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", num_cpus=2,
             logging_level="WARNING")
TorchTrainer(train, train_loop_config={"out": OUT},
             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
             run_config=RunConfig(storage_path=sys.argv[2])).fit()
ray.shutdown()
"""


def make_job(storage: str, *, steps: int, workers: int, log_every: int) -> dict:
    return {
        "name": "startup",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": steps,
            "max_epochs": None,
            "log_every_steps": log_every,
            "optimizer": {"name": "sgd", "lr": 0.1},
            "checkpoint": {"every_epoch": False, "keep_last": 1},
        },
        "strategy": {"kind": "ring" if workers > 1 else "single"},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
        "cluster": {"num_workers": workers, "cpus_per_worker": 1},
        "storage": {"path": storage},
    }


def run_roundhouse(
    job: dict, folder: Path, *extra: str, base_env: dict | None = None
) -> tuple[float, list[dict]]:
    """Launch `roundhouse train`; return (launch time, metrics rows)."""
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**(base_env or os.environ), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "roundhouse.launch.cli", "train", str(path), *extra]
    launched = time.time()
    subprocess.run(command, check=True, env=env, capture_output=True, cwd=folder)
    metrics = next(Path(job["storage"]["path"]).glob("startup/*/metrics.jsonl"))
    return launched, [json.loads(line) for line in metrics.read_text().splitlines()]


def startup_ours() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = make_job(f"{tmp}/runs", steps=1, workers=2, log_every=1)
        launched, rows = run_roundhouse(job, Path(tmp))
        first = next(row for row in rows if row["step"] == 1 and "train/loss" in row)
        return first["time"] - launched


def startup_warm_ours(address: str, env: dict, keep_warm_s: float = 0.0) -> float:
    """`roundhouse train` on the warm cluster with `recovery: live` (roundhouse's own actor
    group, no Ray Train): launch to the end of the first step. With `keep_warm_s`, the run
    reuses (and then leaves) warm actors."""
    with tempfile.TemporaryDirectory() as tmp:
        job = make_job(f"{tmp}/runs", steps=1, workers=2, log_every=1)
        job["cluster"].update(address=address, recovery="live", keep_warm_s=keep_warm_s)
        launched, rows = run_roundhouse(job, Path(tmp), base_env=env)
        first = next(row for row in rows if row["step"] == 1 and "train/loss" in row)
        return first["time"] - launched


def startup_baseline(address: str | None = None, env: dict | None = None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = Path(tmp) / "bare.py", Path(tmp) / "first_step"
        script.write_text(BASELINE)
        env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
        launched = time.time()
        command = [sys.executable, str(script), str(out), f"{tmp}/ray"]
        command += [address] if address else []
        subprocess.run(command, check=True, env=env, capture_output=True, cwd=tmp)
        return float(out.read_text()) - launched


def step_rate(steps: int, *extra: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = make_job(f"{tmp}/runs", steps=steps, workers=1, log_every=WINDOW)
        _, rows = run_roundhouse(job, Path(tmp), *extra)
        rates = [row["train/samples_per_s"] for row in rows if "train/samples_per_s" in row]
        return statistics.median(rates[1:])


def result(name: str, ours: list[float], baseline: list[float], unit: str) -> str:
    a, b = statistics.median(ours), statistics.median(baseline)
    return f"RESULT {name} ours={a:.4g} baseline={b:.4g} ratio={a / b:.3f} unit={unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument(
        "--warm", action="store_true", help="only the warm-cluster startup figure (below)"
    )
    args = parser.parse_args()
    if args.warm:
        warm(args.rounds)
        return
    ours, base, ray_rate, local_rate = [], [], [], []
    for i in range(args.rounds):
        ours.append(startup_ours())
        base.append(startup_baseline())
        ray_rate.append(step_rate(args.steps))
        local_rate.append(step_rate(args.steps, "--local"))
        print(
            f"round {i}: startup {ours[-1]:.2f}s vs {base[-1]:.2f}s, "
            f"step rate {ray_rate[-1]:.0f} vs {local_rate[-1]:.0f} samples/s",
            flush=True,
        )
    print(result("startup", ours, base, "s"))
    print(result("ray_step_rate", ray_rate, local_rate, "samples/s"))


KEEP_WARM_S = 300.0


def warm(rounds: int) -> None:
    """Startup on a warm cluster: one Ray cluster (`ray start`, 5 CPUs: the 2 warm actors stay
    while the others run) for every run; ours (`recovery: live`, 2 workers; fresh actors, then
    reused ones) and bare `TorchTrainer` (2 workers) connect to it in turn."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.ray_cluster import start_cluster

    cluster = start_cluster(head_cpus=5, extra_nodes=())
    address, env = cluster.gcs_address, cluster.env
    ours, reused, base = [], [], []
    try:
        startup_warm_ours(address, env, KEEP_WARM_S)  # leaves 2 warm actors
        for i in range(rounds):
            ours.append(startup_warm_ours(address, env))
            reused.append(startup_warm_ours(address, env, KEEP_WARM_S))
            base.append(startup_baseline(address, env))
            print(
                f"round {i}: warm startup fresh actors {ours[-1]:.2f}s, reused actors "
                f"{reused[-1]:.2f}s vs Ray Train {base[-1]:.2f}s",
                flush=True,
            )
    finally:
        cluster.stop()
    print(result("startup_warm", ours, base, "s"))
    print(result("startup_warm_reused", reused, base, "s"))


if __name__ == "__main__":
    main()
