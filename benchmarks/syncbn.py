"""SyncBatchNorm: `resnet:debug` on the digits with 4 ranks x 4 samples per rank.

Per-rank BatchNorm (`model.options.norm: batch`) normalizes each rank's 4 samples with their own
mean and variance; `sync_batch` all-reduces the statistics, so all 16 samples of the global batch
share them (SEEDS S1:427-434). Both runs go through the real `run_worker` on 4 gloo processes
(spawned here, bound to 127.0.0.1) under the `ring` strategy, with the same seed, data order and
step count. Reported:

- the test accuracy ratio, sync_batch / batch (evaluation uses the running statistics, which
  per-rank BatchNorm estimates from 4-sample batches);
- the step-time ratio, sync_batch / batch: the median of `train/samples_per_s` of each run,
  inverted (sync_batch adds two small all-reduces per BatchNorm layer, forward and backward).

    python benchmarks/syncbn.py [--epochs 2] [--seeds 0]

Ends with `RESULT syncbn_test_accuracy ...` and `RESULT syncbn_step_time ...` lines. On a shared
2-core machine 4 ranks oversubscribe the cores, so the step-time ratio is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4
PER_RANK = 4


def job_for(norm: str, seed: int, epochs: int, storage: str) -> dict:
    """The benchmark job for one normalization choice."""
    return {
        "name": f"syncbn_{norm}",
        "model": {"name": "resnet", "flavor": "debug", "options": {"norm": norm}},
        "data": {"source": "builtin:digits", "batch_size": WORLD * PER_RANK},
        "trainer": {
            "max_epochs": epochs,
            "log_every_steps": 10,
            "eval_every_steps": 10_000,
            "device": "cpu",
            "seed": seed,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "checkpoint": {"every_epoch": False},
        },
        "strategy": {"kind": "ring"},
        "cluster": {"num_workers": WORLD},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": storage, "run_id": f"{norm}-{seed}"},
    }


def rank_main(rank: int, job: dict, port: int) -> None:
    """One gloo rank: the process group, then `run_worker` as the launcher calls it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from roundhouse.config.loading import validate_job
    from roundhouse.trainer import WorkerContext, run_worker

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ctx = WorkerContext(rank, WORLD, rank, WORLD, 0, 1, torch.device("cpu"))
    try:
        run_worker(validate_job(job), ctx)
    finally:
        dist.destroy_process_group()


def train(job: dict) -> Path:
    """Run `job` on `WORLD` spawned ranks; returns its run folder."""
    from roundhouse.config.loading import validate_job
    from roundhouse.parallel.net import free_port
    from roundhouse.weights.run_folder import prepare_run

    prepared = prepare_run(validate_job(job))
    mp.spawn(rank_main, args=(job, free_port()), nprocs=WORLD, join=True)
    return Path(prepared.run_dir.url)


def read_figures(run: Path) -> tuple[float, float]:
    """(test accuracy, median samples per second) from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = next(r["test/accuracy"] for r in reversed(rows) if "test/accuracy" in r)
    speeds = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    return float(accuracy), statistics.median(speeds[1:] or speeds)  # the first holds startup


def main() -> None:
    """Both runs per seed, the per-seed lines and the two RESULT lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {"sync_batch": [], "batch": []}
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            for norm in figures:
                acc, speed = read_figures(train(job_for(norm, seed, args.epochs, storage)))
                figures[norm].append((acc, speed))
                print(f"seed {seed} {norm}: test accuracy {acc:.4f}, {speed:.1f} samples/s")
    acc = {n: statistics.median(a for a, _ in rows) for n, rows in figures.items()}
    step = {n: 1.0 / statistics.median(s for _, s in rows) for n, rows in figures.items()}
    print(
        f"RESULT syncbn_test_accuracy ours={acc['sync_batch']:.4f} baseline={acc['batch']:.4f} "
        f"ratio={acc['sync_batch'] / acc['batch']:.3f} unit=accuracy"
    )
    print(
        f"RESULT syncbn_step_time ours={step['sync_batch'] * 1000:.2f} "
        f"baseline={step['batch'] * 1000:.2f} ratio={step['sync_batch'] / step['batch']:.3f} "
        "unit=ms_per_sample"
    )


if __name__ == "__main__":
    main()
