"""Measured rates of this machine, cached per host and device.

- `StepRate`: seconds of one forward + backward pass as `overhead + per_sample x micro_batch`,
  of one optimizer step and of the loop's own per-step work, plus what DeepSpeed's ZeRO engines
  add, from real steps of the job's own model through roundhouse's loop pieces (`loopcal.py`;
  the model is small enough to build here), or from a matmul's FLOP/s for models too large to
  build.
- `LinkRate`: latency and bandwidth of a gloo all-reduce between two local processes.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

import torch
import torch.multiprocessing as mp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRate:
    """`fwd_bwd(B) = overhead_s + per_sample_s * B`; `optimizer_s` per optimizer step.

    Attributes:
        overhead_s: Fixed seconds of one forward + backward pass.
        per_sample_s: Seconds per sample of one forward + backward pass.
        optimizer_s: One optimizer step over the whole model (with the gradient norm).
        loop_s: The loop's own fixed work per step (the next batch, the finite-loss check).
        zero_fwd_bwd_s: By ZeRO stage: seconds DeepSpeed's engine adds to each forward +
            backward pass of the whole model (its gradient and gather/release hooks).
        zero_optimizer_s: By ZeRO stage: DeepSpeed's optimizer step over the whole model on one
            rank (ZeRO ranks each step their 1/N partition).
        loop_per_sample_s: The loop's work per sample of a step (loading and augmenting it).
    """

    overhead_s: float
    per_sample_s: float
    optimizer_s: float
    loop_s: float = 0.0
    zero_fwd_bwd_s: dict[int, float] = field(default_factory=dict)
    zero_optimizer_s: dict[int, float] = field(default_factory=dict)
    loop_per_sample_s: float = 0.0

    def fwd_bwd(self, micro_batch: float) -> float:
        """Seconds of one forward + backward of `micro_batch` samples: fixed + per-sample cost."""
        return self.overhead_s + self.per_sample_s * micro_batch

    def loop(self, samples: float) -> float:
        """Seconds of the loop's own work for a step of `samples` samples on one rank."""
        return self.loop_s + self.loop_per_sample_s * samples

    @classmethod
    def from_loop(cls, figures: dict[str, float], sizes: tuple[int, int]) -> StepRate:
        """The rate from `loopcal.measure`'s figures at micro-batches `sizes` (small, large)."""
        small, large = sizes
        t_small, t_large = figures["small/fwd_bwd_s"], figures["large/fwd_bwd_s"]
        if large > small:
            per_sample = max(t_large - t_small, 0.0) / (large - small)
        else:
            per_sample = t_large / large
        stages = {int(k[4]) for k in figures if k.startswith("zero")}
        loop_small, loop_large = figures["small/loop_s"], figures["large/loop_s"]
        # Loading (and augmenting) grows with the samples; without two sizes it is all fixed.
        loop_per_sample = (
            max(loop_large - loop_small, 0.0) / (large - small) if large > small else 0.0
        )
        return cls(
            overhead_s=max(t_small - per_sample * small, 0.0),
            per_sample_s=per_sample,
            optimizer_s=(figures["small/optimizer_s"] + figures["large/optimizer_s"]) / 2,
            loop_s=max(loop_small - loop_per_sample * small, 0.0),
            loop_per_sample_s=loop_per_sample,
            zero_fwd_bwd_s={k: max(figures[f"zero{k}/fwd_bwd_s"] - t_small, 0.0) for k in stages},
            zero_optimizer_s={k: figures[f"zero{k}/optimizer_s"] for k in stages},
        )


@dataclass(frozen=True)
class LinkRate:
    """`time(bytes) = latency_s + bytes / bytes_per_s` for one collective call."""

    latency_s: float
    bytes_per_s: float


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


def run_spawned(
    target: Callable[..., None], args: Sequence[tuple], timeout_s: float, what: str
) -> Any:
    """Run `target(*a, queue)` in one spawned process per `a` in `args`; return the value of the
    first `("ok", value)` put on the queue (a calibration's rank 0 puts it, then exits).

    Raises RuntimeError(`what` failed: ...) on an `("error", message)` reply, as soon as a
    process crashes (or all end) without a reply, or after `timeout_s`; every process is ended
    either way.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue)) for a in args]
    for proc in procs:
        proc.start()
    try:
        status, value = "error", f"no result within {timeout_s:.0f} s"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                status, value = queue.get(timeout=1.0)
                break
            except Empty:
                codes = [proc.exitcode for proc in procs if not proc.is_alive()]
                if any(codes) or len(codes) == len(procs):  # a crash, or all ended
                    try:  # a reply put just before the exit
                        status, value = queue.get(timeout=1.0)
                    except Empty:
                        status, value = "error", f"exit codes {codes} and no result"
                    break
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if status != "ok":
        raise RuntimeError(f"{what} failed: {value}")
    return value
