"""Steps/s of roundhouse's `single` loop against a minimal hand-written PyTorch loop.

Same model, same in-memory data, batch and optimizer. roundhouse runs its real loop (data
loader, strategy, scheduler, metrics.jsonl tracking, progress) through `run_worker`; its
throughput is the median of the `train/samples_per_s` windows it logs (the loop's own
wall-clock measurement over `log_every_steps` steps, warm-up window excluded). The baseline is
timed over the same windows. Rounds alternate to share the machine's noise; medians are reported.

    python benchmarks/trainer_overhead.py [--rounds 5] [--steps 120]

Prints `RESULT trainer_overhead ours=<samples/s> baseline=<samples/s> ratio=... unit=samples/s`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from roundhouse import models
from roundhouse.config.loading import validate_job
from roundhouse.data import build_splits
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run

WINDOW = 10


def make_job(storage: str, steps: int, model: str, batch: int) -> dict:
    return {
        "name": "overhead",
        "model": {"name": model, "flavor": "debug"},
        "data": {
            "source": "builtin:synthetic",
            "batch_size": batch,
            "split": [0.9, 0.05, 0.05],
            "options": {"shape": [3, 32, 32], "num_samples": 4096},
        },
        "trainer": {
            "max_steps": steps,
            "log_every_steps": WINDOW,
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            "optimizer": {"name": "sgd", "lr": 0.01},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
        "storage": {"path": storage},
    }


def roundhouse_rate(steps: int, model: str, batch: int) -> float:
    with tempfile.TemporaryDirectory() as storage:
        job = validate_job(make_job(storage, steps, model, batch))
        prepared = prepare_run(job)
        run_worker(prepared.job, build_local_context("cpu"))
        rows = [json.loads(x) for x in (Path(prepared.run_dir.url) / "metrics.jsonl").open()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    return statistics.median(rates[1:])


def baseline_rate(steps: int, model_name: str, batch: int) -> float:
    """The loop anyone would write: index a tensor, forward, loss, backward, step."""
    job = validate_job(make_job("/tmp", steps, model_name, batch))
    torch.manual_seed(0)
    splits = build_splits(job.data, seed=0)
    x, y = splits.train.inputs, splits.train.targets
    config = models.BuildConfig(
        input_shape=splits.info.input_shape, num_classes=splits.info.num_classes
    )
    model = models.build_model(model_name, config)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    order = torch.randperm(len(x))
    rates, start = [], time.perf_counter()
    for step in range(steps):
        i = (step * batch) % (len(x) - batch)
        idx = order[i : i + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % WINDOW == 0:
            now = time.perf_counter()
            rates.append(WINDOW * batch / (now - start))
            start = now
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    ours, base = [], []
    for r in range(args.rounds):
        base.append(baseline_rate(args.steps, args.model, args.batch))
        ours.append(roundhouse_rate(args.steps, args.model, args.batch))
        print(f"round {r}: ours={ours[-1]:.1f} baseline={base[-1]:.1f} samples/s", flush=True)
    o, b = statistics.median(ours), statistics.median(base)
    print(f"RESULT trainer_overhead ours={o:.1f} baseline={b:.1f} ratio={o / b:.3f} unit=samples/s")


if __name__ == "__main__":
    main()
