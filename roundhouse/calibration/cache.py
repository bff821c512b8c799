"""The calibration cache, and this machine's matmul and memory rates.

Every measurement of `roundhouse.calibration` (the job's own step, `loop.py`; the link,
`link.py`; the exchange residuals, `exchange.py`; a matmul's FLOP/s and a memory stream's
bytes/s, here) is stored through `cached`.

Results go to `$ROUNDHOUSE_CACHE_DIR/calibration.json` (default `~/.cache/roundhouse`), keyed by
host name, device, thread count and (for a model's step) the model and micro-batch, so a second
`roundhouse plan` on the same machine measures nothing. Inside `remeasured()` (`roundhouse plan
--recalibrate`) each entry a plan reads is measured again, once, and replaces the stored one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def cache_path() -> Path:
    """The per-machine calibration cache file (`ROUNDHOUSE_CACHE_DIR`, else ~/.cache/roundhouse)."""
    root = os.environ.get("ROUNDHOUSE_CACHE_DIR") or Path.home() / ".cache" / "roundhouse"
    return Path(root) / "calibration.json"


# The full keys measured afresh inside the current `remeasured()` block; None outside one.
_remeasured: set[str] | None = None


@contextmanager
def remeasured() -> Iterator[None]:
    """Inside the block `cached` measures each entry again (once) and replaces the stored one.

    For a cache filled on a busy machine, or after the machine changed: `roundhouse plan
    --recalibrate`. Entries the block does not read stay as they are.
    """
    global _remeasured
    outer, _remeasured = _remeasured, set()
    try:
        yield
    finally:
        _remeasured = outer


def cached(key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """The cached entry `key` of this host, measuring (and storing) it when absent."""
    path = cache_path()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    full_key = f"{socket.gethostname()}/{key}"
    stale = _remeasured is not None and full_key not in _remeasured
    if full_key not in table or stale:
        logger.info("calibrating %s (cached in %s)", key, path)
        value = measure()
        try:  # re-read: `measure` may have cached entries of its own (a nested calibration)
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[full_key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(path)
        if _remeasured is not None:  # marked once stored: a failed measurement is tried again
            _remeasured.add(full_key)
    return table[full_key]


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The median seconds of `repeats` calls of `fn`, after `warmup` untimed ones."""
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
