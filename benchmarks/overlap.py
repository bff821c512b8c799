"""How much of the ring strategy's gradient communication hides behind backward.

Two processes (gloo on CPU) train the zoo's ResNet (`debug` flavor by default) on synthetic
images, timing three step kinds, alternated per round so they share the machine's noise:

- `compute`: forward, backward and optimizer step with no communication (single-device);
- `comm`: averaging all gradient buckets alone (no backward running);
- `overlapped`: the real `ring` strategy, buckets reduced while backward runs.

Hidden share = (compute + comm - overlapped) / comm, clipped to [0, 1]: 1 means the step costs
no more than its computation. Medians over rounds. Language models (e.g. `--model gpt --flavor
small`) train on random byte sequences of `--seq-len`.

    python benchmarks/overlap.py [--model resnet] [--flavor debug] [--steps 10] [--rounds 3]
    python benchmarks/overlap.py --model gpt --flavor small --batch 4 --seq-len 128

Ends with `RESULT overlap_<model>_hidden ours=<share> baseline=0.7 ratio=... unit=fraction`
(baseline: the issue's target) and `RESULT overlap_<model>_step ours=<overlapped s>
baseline=<compute + comm s> ratio=... unit=s`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from roundhouse import models
from roundhouse.config import LossConfig, OptimizerConfig, RingStrategyConfig, SchedulerConfig
from roundhouse.data.text import VOCAB_SIZE
from roundhouse.parallel.base import Strategy, TrainPlan
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.net import free_port
from roundhouse.parallel.ring.strategy import RingStrategy
from roundhouse.parallel.single import SingleDeviceStrategy
from roundhouse.trainer.optim import build_optimizer, build_scheduler
from roundhouse.trainer.task import build_task

logger = logging.getLogger("overlap")
TARGET = 0.7
VOCAB = VOCAB_SIZE  # byte-level tokens


def is_language_model(args: argparse.Namespace) -> bool:
    return models.get(args.model).loss == "language_model"


def input_spec(args: argparse.Namespace) -> tuple[tuple[int, ...], int]:
    """(per-sample input shape, classes): 3x32x32 images, or byte sequences for an LM."""
    if is_language_model(args):
        return (args.seq_len,), VOCAB
    return (3, 32, 32), 10


def build_batch(args: argparse.Namespace, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rank)
    shape, classes = input_spec(args)
    if is_language_model(args):
        tokens = torch.randint(0, classes, (args.batch, args.seq_len + 1), generator=gen)
        return {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    return {
        "input": torch.randn(args.batch, *shape, generator=gen),
        "target": torch.randint(0, classes, (args.batch,), generator=gen),
    }


def build_strategy_for(kind: str, args: argparse.Namespace, ctx: WorkerContext) -> Strategy:
    torch.manual_seed(0)
    shape, classes = input_spec(args)
    config = models.BuildConfig(flavor=args.flavor, input_shape=shape, num_classes=classes)
    model = models.build_model(args.model, config)
    plan = TrainPlan(
        task=build_task(models.get(args.model).loss, LossConfig()),
        build_optimizer=lambda p: build_optimizer(p, config=OptimizerConfig(name="sgd", lr=0.01)),
        build_scheduler=lambda o: build_scheduler(
            o, config=SchedulerConfig(), steps_per_epoch=1, total_steps=1
        ),
    )
    ring = RingStrategyConfig(kind="ring", bucket_mb=args.bucket_mb)
    strategy = RingStrategy(ring, ctx) if kind == "ring" else SingleDeviceStrategy(None, ctx)
    strategy.setup(model, plan)
    strategy.train_mode(True)
    return strategy


def time_steps(fn, steps: int) -> float:
    """Median seconds of `fn()` after one warm-up call; ranks start each call together."""
    fn()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_round(strategies: dict[str, Strategy], batch: dict, steps: int) -> dict[str, float]:
    def train_step(strategy: Strategy):
        return lambda: (
            strategy.forward_backward(batch, loss_scale=1.0, sync=True),
            strategy.optimizer_step(need_grad_norm=False),
        )

    ring = strategies["ring"]

    def comm_only() -> None:  # the buckets of the gradients already there, nothing else
        ring.comm.begin()
        ring.comm.flush()
        ring.comm.wait()

    ring.forward_backward(batch, loss_scale=1.0, sync=True)
    return {
        "comm": time_steps(comm_only, steps),
        "compute": time_steps(train_step(strategies["single"]), steps),
        "overlapped": time_steps(train_step(ring), steps),
    }


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ctx = WorkerContext(rank=rank, world_size=world)
    single_ctx = WorkerContext()
    strategies = {
        "ring": build_strategy_for("ring", args, ctx),
        "single": build_strategy_for("single", args, single_ctx),
    }
    batch = build_batch(args, rank)
    rounds = [one_round(strategies, batch, args.steps) for _ in range(args.rounds)]
    if rank == 0:
        results.put({k: statistics.median(r[k] for r in rounds) for k in rounds[0]})
    strategies["ring"].close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet")
    parser.add_argument("--flavor", default="debug")
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--seq-len", type=int, default=128, help="language models")
    parser.add_argument("--bucket-mb", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = mp.get_context("spawn").Queue()
    mp.start_processes(worker, args=(args.world, free_port(), args, results), nprocs=args.world)
    t = results.get()
    hidden = min(1.0, max(0.0, (t["compute"] + t["comm"] - t["overlapped"]) / t["comm"]))
    logger.info(
        "%s/%s: compute %.4f s, comm %.4f s, overlapped %.4f s per step",
        args.model,
        args.flavor,
        t["compute"],
        t["comm"],
        t["overlapped"],
    )
    serial = t["compute"] + t["comm"]
    name = f"overlap_{args.model}"
    print(f"RESULT {name}_hidden ours={hidden:.3f} baseline={TARGET} ", end="")
    print(f"ratio={hidden / TARGET:.3f} unit=fraction")
    step = t["overlapped"]
    print(f"RESULT {name}_step ours={step:.4g} baseline={serial:.4g} ", end="")
    print(f"ratio={step / serial:.3f} unit=s")


if __name__ == "__main__":
    main()
