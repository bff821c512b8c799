"""Bus bandwidth of roundhouse's ring all-reduce against `torch.distributed.all_reduce`.

For each world size, processes on this machine (gloo on CPU; nccl with `--backend nccl` and one
GPU per rank) all-reduce fp32 buffers of 1 KB to 256 MB with both algorithms, alternating
them per repetition so they share the machine's noise. Bus bandwidth is
`bytes / seconds * 2(N-1)/N` (what each rank's link carries), median over repetitions.

    python benchmarks/allreduce.py [--worlds 2 4] [--sizes-mb 0.001 ... 256] [--reps 5]

Ends with `RESULT allreduce_<size>_w<N> ours=<ring GB/s> baseline=<native GB/s> ratio=...
unit=GB/s` per size and world size.
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

from roundhouse.parallel.net import free_port
from roundhouse.parallel.ring import native_all_reduce_, ring_all_reduce_

logger = logging.getLogger("allreduce")
SIZES_MB = [2**-10, 2**-6, 0.25, 4, 64, 256]
ALGORITHMS = {"ring": ring_all_reduce_, "native": native_all_reduce_}


def size_name(mb: float) -> str:
    return f"{round(mb * 1024)}kb" if mb < 1 else f"{round(mb)}mb"


def time_once(fn, buffer: torch.Tensor) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn(buffer)
    if buffer.is_cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the collective ends when its last rank does
    return float(elapsed)


def measure(size_mb: float, reps: int, device: torch.device) -> dict[str, float]:
    """Median bus bandwidth (GB/s) of each algorithm for one buffer size."""
    world = dist.get_world_size()
    buffer = torch.randn(max(1, int(size_mb * 2**20) // 4), device=device)
    times: dict[str, list[float]] = {name: [] for name in ALGORITHMS}
    for fn in ALGORITHMS.values():
        time_once(fn, buffer)  # warm-up: connections, allocations
    for _ in range(reps):
        for name, fn in ALGORITHMS.items():
            times[name].append(time_once(fn, buffer))
    nbytes = buffer.numel() * buffer.element_size()
    factor = 2 * (world - 1) / world
    return {n: nbytes / statistics.median(t) * factor / 1e9 for n, t in times.items()}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    for size_mb in args.sizes_mb:
        reps = args.reps if size_mb < 64 else max(1, args.reps // 2)
        figures = measure(size_mb, reps, device)
        if rank == 0:
            results.put((world, size_mb, figures))
    dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace) -> list[tuple]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(
        worker, args=(world, free_port(), args, results), nprocs=world, start_method="spawn"
    )
    return [results.get() for _ in args.sizes_mb]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=SIZES_MB)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [row for world in args.worlds for row in run_world(world, args)]
    logger.info("%6s %10s %12s %12s %6s", "world", "size", "ring GB/s", "native GB/s", "ratio")
    for world, size_mb, fig in rows:
        ratio = fig["ring"] / fig["native"]
        logger.info(
            "%6d %10s %12.3f %12.3f %6.2f",
            world,
            size_name(size_mb),
            fig["ring"],
            fig["native"],
            ratio,
        )
    for world, size_mb, fig in rows:
        print(
            f"RESULT allreduce_{size_name(size_mb)}_w{world} ours={fig['ring']:.4g} "
            f"baseline={fig['native']:.4g} ratio={fig['ring'] / fig['native']:.3f} unit=GB/s"
        )


if __name__ == "__main__":
    main()
