"""Bandwidth calibration: a small gloo all-reduce between two local processes (cached).

Two processes on 127.0.0.1 all-reduce a one-element tensor (the latency of one collective
call) and an 8 MB tensor; the line through the two median times gives the bus bandwidth (a
2-rank all-reduce moves `2(N-1)/N = 1` times the tensor's bytes per rank). The latency is
measured, not extrapolated: an intercept fitted through two large sizes moved 4x between
runs on a 2-core machine, and ZeRO-3's per-module calls multiply it. Planning a cluster you are
not on takes `--bandwidth` instead.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.distributed as dist

from roundhouse.calibration.cache import cached
from roundhouse.calibration.ranks import run_ranks
from roundhouse.parallel.costs import LinkRate

logger = logging.getLogger(__name__)

SIZES = (1, 1 << 21)  # fp32 elements: one (latency) and 8 MB (bandwidth)
REPEATS = (40, 10)  # timed calls per size, after WARMUP
WARMUP = 3
TIMEOUT_S = 120


def time_allreduce(rank: int) -> list[float]:
    """In a rank of the pair: the median seconds of an all-reduce at each of `SIZES`."""
    times = []
    for size, repeats in zip(SIZES, REPEATS, strict=True):
        x = torch.ones(size)
        samples = []
        for i in range(WARMUP + repeats):
            start = time.perf_counter()
            dist.all_reduce(x)
            if i >= WARMUP:
                samples.append(time.perf_counter() - start)
        times.append(statistics.median(samples))
    return times


def measure_link() -> dict[str, float]:
    """Latency and bandwidth of a 2-process gloo all-reduce on this machine."""
    t_small, t_large = run_ranks(
        time_allreduce, (), world_size=2, threads=1, timeout_s=TIMEOUT_S, what="link calibration"
    )
    bytes_small, bytes_large = 4 * SIZES[0], 4 * SIZES[1]
    per_byte = max(t_large - t_small, 1e-9) / (bytes_large - bytes_small)
    return {"latency_s": t_small, "bytes_per_s": 1 / per_byte}


def local_link() -> LinkRate:
    """This machine's calibrated gloo link (measured once, then read from the cache)."""
    return LinkRate(**cached(f"gloo/allreduce2/{SIZES[0]}-{SIZES[1]}", measure_link))
