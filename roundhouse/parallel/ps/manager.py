"""Parameter-server shards in a separate process, reachable from processes of this machine.

A `multiprocessing` manager process hosts `ShardServer` objects (the same class Ray runs as
actors); every rank connects and wraps proxies of them in a `LocalParameterStore`. Each proxy
call runs in its own thread of the manager, so a pull that waits (sync, ssp) does not block
other ranks' pushes. It runs the real server code without Ray's startup cost: the planner's
exchange probe (`calibration/exchange.py`), the multi-process ps tests and benchmarks use it;
jobs use Ray actors (`ps/remote.py` and `cluster/services.py`, covered by
tests/integration/test_ps_ray.py).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.managers import BaseManager

from roundhouse.parallel.ps import LocalParameterStore, ShardServer

_SERVERS: dict[int, ShardServer] = {}


def _get_shard(index: int) -> ShardServer:
    """In the manager process: shard `index` (created on first use)."""
    if index not in _SERVERS:
        _SERVERS[index] = ShardServer(index)
    return _SERVERS[index]


class ShardManager(BaseManager):
    """Serves `get_shard(i)` proxies."""


ShardManager.register(
    "get_shard",
    callable=_get_shard,
    exposed=(
        "ping",
        "wire_address",
        "initialize",
        "push",
        "pull",
        "push_rows",
        "pull_rows",
        "claim",
        "set_idle",
        "state_dict",
        "resize",
    ),
)

Address = tuple[str, bytes]


@contextmanager
def shard_manager() -> Iterator[Address]:
    """Start a manager process on a unix socket; yields (address, authkey) for `connect_store`.

    A unix socket, not TCP: multiprocessing sends a large message's header and body in two
    writes, which Nagle's algorithm and delayed ACKs stall ~40 ms per push on loopback TCP,
    enough to hide a straggler's slowness behind the transport.
    """
    authkey = b"roundhouse-ps-test"
    folder = tempfile.mkdtemp(prefix="rhps", dir="/tmp")
    address = os.path.join(folder, "shards.sock")
    # A child of the fork server, not a fork of this process: a fork that runs torch's intra-op
    # pool after the parent used it fails with "Invalid thread pool" (the sparse row updates
    # hit it). Nor spawned: a fresh interpreter takes ~1 s to import torch and ~1 s to exit.
    # The fork server imports what `multiprocessing.set_forkserver_preload` names (the tests
    # preload torch and this module, tests/conftest.py) before its first fork.
    manager = ShardManager(address=address, authkey=authkey, ctx=mp.get_context("forkserver"))
    manager.start()
    try:
        yield manager.address, authkey
    finally:
        manager.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def connect_store(address: Address, num_servers: int) -> LocalParameterStore:
    """In a rank: a store whose shards are proxies of the manager's shards 0..num_servers-1."""
    host, authkey = address
    manager = ShardManager(address=host, authkey=authkey)
    manager.connect()
    return LocalParameterStore(servers=[manager.get_shard(i) for i in range(num_servers)])
