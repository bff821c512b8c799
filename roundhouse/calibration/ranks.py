"""The one spawned-rank helper every calibration runs its measurements through.

`run_ranks(work, args, world_size=N, ...)` spawns N processes. Each sets its thread count,
quiets the engines' banners, joins a fresh process group on loopback (its own, so the caller's
process group and thread count stay untouched; DeepSpeed keeps the first group it sees, so
every engine in a rank shares this one), calls `work(rank, *args)` and leaves the group. Rank
0's return value comes back; an exception in any rank, a crash, or the timeout raises
`RuntimeError` in the caller, and every process is ended either way.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from queue import Empty
from typing import Any

import torch
import torch.multiprocessing as mp


def _rank_main(
    rank: int,
    work: Callable[..., Any],
    args: tuple,
    world_size: int,
    threads: int,
    backend: str,
    port: int,
    queue: Any,
) -> None:
    import torch.distributed as dist

    names = [name for _, name in socket.if_nameindex()]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if "lo" in names else names[0])
    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)  # the engines' banners; failures still reach the parent
    warnings.simplefilter("ignore")  # torch's deprecations inside DeepSpeed, in every rank
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        value = work(rank, *args)
        if rank == 0:
            queue.put(("ok", value))
    except BaseException as exc:  # the parent re-raises it
        queue.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def run_ranks(
    work: Callable[..., Any],
    args: tuple,
    *,
    world_size: int,
    threads: int,
    timeout_s: float,
    what: str,
    backend: str = "gloo",
) -> Any:
    """`work(rank, *args)` on `world_size` spawned ranks of one process group; rank 0's value.

    Args:
        work: A module-level function (it is pickled into the spawned processes).
        args: Its arguments after the rank (picklable).
        world_size: Ranks to spawn.
        threads: torch threads per rank.
        timeout_s: Seconds to wait for rank 0's value.
        what: The measurement's name, for the error.
        backend: The process group's backend (`nccl` for a GPU calibration).

    Raises:
        RuntimeError: `what` failed (a rank raised, crashed, or the timeout passed).
    """
    from roundhouse.parallel.net import free_port

    port = free_port()
    every = [(r, work, args, world_size, threads, backend, port) for r in range(world_size)]
    return run_spawned(_rank_main, every, timeout_s, what)


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
