"""`run_distributed`: run a function on N gloo processes on this machine, with a hang timeout.

Each rank is a process forked from a fork server (started once, with torch imported) that
initialises the default process group (gloo on 127.0.0.1, a free port), limits torch to one
thread (several ranks share few cores; oversubscribed OpenMP threads slow torch down many
times), calls `fn(rank, world_size, *args)` and sends back its return value or its exception.
The parent re-raises the first failure with its rank, fails with "rank r hung" when a rank has
not answered in `timeout_s`, and always kills what is left.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from roundhouse.parallel.net import free_port

# What the fork server imports before its first fork. The first user of the `forkserver`
# context starts it; tests/conftest.py sets this list at import so that every user (these
# ranks, `parallel/ps/manager.py`'s shard manager) forks from a server that has it.
PRELOAD = [
    "torch",
    "torch.distributed",
    # torch.optim imports dynamo as the first optimizer is built: ~1.7 s in every rank otherwise
    "torch._dynamo",
    "roundhouse.trainer",
    "roundhouse.parallel.ps.manager",
    "tests.helpers.dist",
]


class DistributedTestError(AssertionError):
    """A rank failed or hung."""


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    # gloo would otherwise pick the interface of the host name, which may not be loopback.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", _loopback_interface())
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, True, _to_bytes(fn(rank, world_size, *args))))
    except BaseException as exc:  # every failure goes back to the parent
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_bytes(value: Any) -> bytes:
    # Tensors put on a torch.multiprocessing queue travel as shared-memory handles, which die
    # with the child; plain bytes outlive it.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else names[0]


def run_distributed(fn: Callable, world_size: int, timeout_s: float, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` processes; return results by rank.

    `fn` must be importable (module level) and its arguments and result picklable.

    Raises:
        DistributedTestError: a rank raised (the message holds its rank and traceback) or did
            not finish within `timeout_s` seconds ("rank r hung").
    """
    ctx = mp.get_context("forkserver")
    # The fork server imports torch and roundhouse once; every rank is then a cheap fork of it
    # (a fresh `spawn` re-imports them: ~5 s per rank on a busy 2-core machine).
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world_size, port, args, results), daemon=True)
        for rank in range(world_size)
    ]
    ok = False
    try:
        for proc in procs:
            proc.start()
        values = _collect(results, procs, timeout_s)
        ok = True
        return values
    finally:
        _stop(procs, graceful=ok)


def _collect(results, procs: list, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    while len(values) < len(procs):
        try:
            rank, ok, value = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
        except queue.Empty:
            _check_alive(results, procs, values, deadline, timeout_s)
            continue
        if not ok:
            raise DistributedTestError(f"rank {rank} failed: {value}")
        values[rank] = torch.load(io.BytesIO(value), weights_only=False)  # our own children
    return [values[r] for r in range(len(procs))]


def _check_alive(results, procs: list, values: dict, deadline: float, timeout_s: float) -> None:
    """Fail on a rank that died without a word (a crash) or on the deadline (a hang)."""
    missing = [r for r in range(len(procs)) if r not in values]
    dead = [r for r in missing if not procs[r].is_alive()]
    if dead and results.empty():
        time.sleep(1.0)  # let a result written just before exiting arrive
        if results.empty():
            code = procs[dead[0]].exitcode
            raise DistributedTestError(f"rank {dead[0]} exited with code {code} and no result")
    if time.monotonic() >= deadline:
        raise DistributedTestError(
            f"rank {missing[0]} hung (no result after {timeout_s} s; waiting for ranks {missing})"
        )


def _stop(procs: list, *, graceful: bool) -> None:
    """Let finished ranks exit; kill every rank still running (all of them after a failure)."""
    for proc in procs:
        if graceful:
            proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=5)
