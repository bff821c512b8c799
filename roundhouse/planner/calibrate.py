"""Measured rates of this machine, cached per host and device.

- `StepRate`: seconds of one forward + backward pass as `overhead + per_sample x micro_batch`,
  and of one optimizer step, from a few real steps of the job's own model at two micro-batch
  sizes (the model is small enough to build here), or from a matmul's FLOP/s for models too
  large to build.
- `LinkRate`: latency and bandwidth of a gloo all-reduce between two local processes.

Results go to `$ROUNDHOUSE_CACHE_DIR/calibration.json` (default `~/.cache/roundhouse`), keyed by
host name, device, thread count and (for a model's step) the model and micro-batch, so a second
`roundhouse plan` on the same machine measures nothing.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRate:
    """`fwd_bwd(B) = overhead_s + per_sample_s * B`; `optimizer_s` per optimizer step."""

    overhead_s: float
    per_sample_s: float
    optimizer_s: float

    def fwd_bwd(self, micro_batch: float) -> float:
        return self.overhead_s + self.per_sample_s * micro_batch


@dataclass(frozen=True)
class LinkRate:
    """`time(bytes) = latency_s + bytes / bytes_per_s` for one collective call."""

    latency_s: float
    bytes_per_s: float


def cache_path() -> Path:
    root = os.environ.get("ROUNDHOUSE_CACHE_DIR") or Path.home() / ".cache" / "roundhouse"
    return Path(root) / "calibration.json"


def cached(key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The cached entry `key` of this host, measuring (and storing) it when absent."""
    path = cache_path()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    full_key = f"{socket.gethostname()}/{key}"
    if full_key not in table:
        logger.info("calibrating %s (cached in %s)", key, path)
        table[full_key] = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
    return table[full_key]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_rate(threads: int, dim: int = 512) -> float:
    """FLOP/s of an fp32 `dim x dim` matmul on this CPU with `threads` threads (cached)."""

    def measure() -> dict[str, float]:
        with thread_count(threads):
            a, b = torch.randn(dim, dim), torch.randn(dim, dim)
            seconds = median_time(lambda: a @ b, repeats=20)
        return {"flops_per_s": 2 * dim**3 / seconds}

    return cached(f"cpu/threads{threads}/matmul{dim}", measure)["flops_per_s"]


def memory_rate(threads: int) -> float:
    """Bytes/s of an in-place add over a 64 MB tensor (what an optimizer step streams)."""

    def measure() -> dict[str, float]:
        with thread_count(threads):
            x, y = torch.ones(16 << 20), torch.ones(16 << 20)
            seconds = median_time(lambda: x.add_(y), repeats=10)
        return {"bytes_per_s": 3 * x.numel() * 4 / seconds}

    return cached(f"cpu/threads{threads}/memory", measure)["bytes_per_s"]


class thread_count:
    """Runs the body with `torch.set_num_threads(threads)`, restoring the old count."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.old = torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


def step_rate(
    key: str,
    make_step: Callable[[int], tuple[Callable, Callable]],
    sizes: tuple[int, int],
    threads: int,
) -> StepRate:
    """Calibrate a model's step: `make_step(B)` returns (fwd_bwd, optimizer_step) callables."""

    def measure() -> dict[str, float]:
        with thread_count(threads):
            small, large = sizes
            fwd_small, _ = make_step(small)
            fwd_large, opt = make_step(large)
            t_small = median_time(fwd_small, repeats=5)
            t_large = median_time(fwd_large, repeats=5)
            t_opt = median_time(opt, repeats=5)
        per_sample = max(t_large - t_small, 0.0) / max(large - small, 1)
        overhead = max(t_small - per_sample * small, 0.0)
        return asdict(StepRate(overhead, per_sample if large > small else t_large / large, t_opt))

    return StepRate(**cached(f"cpu/threads{threads}/step/{key}/{sizes[0]}-{sizes[1]}", measure))
