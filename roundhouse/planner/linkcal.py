"""Bandwidth calibration: a small gloo all-reduce between two local processes (cached).

Two processes on 127.0.0.1 all-reduce 256 KB and 8 MB tensors; the line through the two times
gives the latency of one collective call and the bus bandwidth (a 2-rank all-reduce moves
`2(N-1)/N = 1` times the tensor's bytes per rank). Planning a cluster you are not on takes
`--bandwidth` instead.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from roundhouse.planner.calibrate import LinkRate, cached

logger = logging.getLogger(__name__)

SIZES = (1 << 16, 1 << 21)  # fp32 elements: 256 KB and 8 MB
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, port: int, results: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    names = [name for _, name in socket.if_nameindex()]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if "lo" in names else names[0])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        times = []
        for size in SIZES:
            x = torch.ones(size)
            samples = []
            for i in range(8):
                start = time.perf_counter()
                dist.all_reduce(x)
                if i >= 2:
                    samples.append(time.perf_counter() - start)
            times.append(statistics.median(samples))
        if rank == 0:
            results.put(times)
    finally:
        dist.destroy_process_group()


def measure_link() -> dict[str, float]:
    """Latency and bandwidth of a 2-process gloo all-reduce on this machine."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for proc in procs:
        proc.start()
    try:
        t_small, t_large = results.get(timeout=TIMEOUT_S)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    bytes_small, bytes_large = 4 * SIZES[0], 4 * SIZES[1]
    per_byte = max(t_large - t_small, 1e-9) / (bytes_large - bytes_small)
    return {"latency_s": max(t_small - per_byte * bytes_small, 0.0), "bytes_per_s": 1 / per_byte}


def local_link() -> LinkRate:
    """This machine's calibrated gloo link (measured once, then read from the cache)."""
    return LinkRate(**cached("gloo/allreduce2", measure_link))
