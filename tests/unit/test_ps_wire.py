"""The parameter server's socket data path (`parallel/ps/wire.py`) and the store over it.

The store runs over real `ShardServer`s reached through `InProcessGroup` (a `ServiceGroup`
whose calls run the servers' methods on threads of this process, as Ray runs them on an
actor's threads) or through the test manager process (`ps/manager.py`), so a server can die
for real. The pushes and pulls themselves go over loopback TCP sockets.
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from roundhouse.parallel.ps import LocalParameterStore, ServerNotReadyError, ShardServer
from roundhouse.parallel.ps.manager import ShardManager, shard_manager
from roundhouse.parallel.ps.remote import RemoteParameterStore
from roundhouse.parallel.ps.wire import (
    WireAddress,
    WireClosedError,
    WireConnection,
    WireListener,
    node_host,
    recv_exact,
    send_buffers,
)
from roundhouse.parallel.services import ServiceGroup
from tests.unit.test_ps_local import sgd_setup

pytestmark = pytest.mark.timeout(60)


class InProcessGroup:
    """`ServiceGroup` over objects of this process; each call runs on a pool thread."""

    def __init__(self, servers: list[Any]) -> None:
        self.servers = servers
        self.pool = ThreadPoolExecutor(8)

    @property
    def size(self) -> int:
        return len(self.servers)

    def call(self, index: int, method: str, *args: Any) -> Future:
        return self.pool.submit(getattr(self.servers[index], method), *args)

    def get(self, handles: list[Any]) -> list[Any]:
        return [h.result(timeout=30) for h in handles]


class ManagerGroup(InProcessGroup):
    """`ServiceGroup` over the shards of a manager process (proxies are not thread-safe:
    calls run one at a time)."""

    def __init__(self, servers: list[Any]) -> None:
        super().__init__(servers)
        self.pool = ThreadPoolExecutor(1)


def initialized(mode: str, num_pushers: int, shard: int = 0) -> ShardServer:
    server = ShardServer(shard)
    params = [np.zeros(2, dtype=np.float32), np.ones(1, dtype=np.float32)]
    server.initialize(sgd_setup(mode, num_pushers), [3, 7], params)
    return server


def grads(g3: float, g7: float) -> np.ndarray:
    return np.array([g3, g3, g7], dtype=np.float32)


def test_the_group_is_a_service_group() -> None:
    assert isinstance(InProcessGroup([]), ServiceGroup)


def test_send_buffers_delivers_large_arrays_whole_and_in_order() -> None:
    a, b = socket.socketpair()
    payload = np.arange(3_000_000, dtype=np.float32)  # 12 MB: many partial sends
    sender = threading.Thread(target=send_buffers, args=(a, [b"head", payload, b""]))
    sender.start()
    assert recv_exact(b, 4) == b"head"
    got = np.frombuffer(recv_exact(b, payload.nbytes), dtype=np.float32)
    sender.join(10)
    np.testing.assert_array_equal(got, payload)
    a.close()
    with pytest.raises(WireClosedError):
        recv_exact(b, 1)


def test_sync_pushes_and_pulls_over_sockets_match_the_in_process_store() -> None:
    group = InProcessGroup([initialized("sync", 2)])
    workers = [RemoteParameterStore(group) for _ in range(2)]  # one per worker, as in a job
    local = LocalParameterStore(servers=[initialized("sync", 2)])
    for store, pusher in ((workers[0], 0), (local, 0), (workers[1], 1), (local, 1)):
        if pusher == 0:
            store.push(0, 0, 0, [3, 7], grads(1.0, 2.0), [True, True], 1, pull_step=1)
        else:  # in two pieces
            store.push(0, 1, 0, [7], np.array([4.0], dtype=np.float32), [True], 1)
            store.push(0, 1, 0, [3], np.array([3.0, 3.0], dtype=np.float32), [True], 1)
    for pusher in (0, 1):
        ours, theirs = workers[pusher].pull([0], pusher, 1)[0], local.pull([0], pusher, 1)[0]
        np.testing.assert_array_equal(ours.flat, theirs.flat)
        np.testing.assert_allclose(ours.flat, [-1.0, -1.0, -0.5])  # lr 0.5, mean [2, 2, 3]
        assert (ours.version, ours.lr, ours.ahead) == (theirs.version, theirs.lr, theirs.ahead)
        assert ours.grad_sq_norm == pytest.approx(theirs.grad_sq_norm)
        assert workers[pusher].links[0] is not None  # the socket carried it, not service calls


def test_a_pull_before_any_update_reports_no_gradient_norm() -> None:
    store = RemoteParameterStore(InProcessGroup([initialized("async", 1)]))
    reply = store.pull([0], 0, 0)[0]
    assert reply.grad_sq_norm is None and reply.version == 0
    np.testing.assert_array_equal(reply.flat, [0.0, 0.0, 1.0])


def test_a_push_the_shard_refuses_fails_the_next_pull_as_itself() -> None:
    store = RemoteParameterStore(InProcessGroup([initialized("async", 1)]))
    store.push(0, 0, 0, [5], np.zeros(1, dtype=np.float32), [True], 1)  # not on this shard
    with pytest.raises(ValueError, match="parameter 5 is not on shard 0"):
        store.pull([0], 0, 0)
    assert store.pull([0], 0, 0)[0].version == 0  # the connection stays usable


def test_a_call_to_an_uninitialized_shard_raises_server_not_ready() -> None:
    store = RemoteParameterStore(InProcessGroup([ShardServer(0)]))
    with pytest.raises(ServerNotReadyError):
        store.pull([0], 0, 0)


def test_a_wrong_token_is_refused() -> None:
    listener = WireListener(initialized("async", 1), host="127.0.0.1")
    try:
        wrong = WireAddress("127.0.0.1", listener.address.port, b"x" * 16)
        with pytest.raises(ConnectionError):
            WireConnection(wrong)
    finally:
        listener.close()


def test_a_closed_server_fails_a_waiting_pull_at_once_and_a_restart_reconnects() -> None:
    group = InProcessGroup([initialized("sync", 2)])
    store = RemoteParameterStore(group)
    store.push(0, 0, 0, [3, 7], grads(1.0, 1.0), [True, True], 1, pull_step=1)
    time.sleep(0.2)  # the shard now waits for pusher 1
    start = time.monotonic()
    group.servers[0].listener.close()  # as if the server's process died
    with pytest.raises(WireClosedError):
        store.pull([0], 0, 1)
    assert time.monotonic() - start < 5
    group.servers[0] = ShardServer(0)  # restarted empty behind the same handle
    with pytest.raises(ServerNotReadyError):
        store.pull([0], 0, 0)  # a new connection, to the new server
    store.initialize(0, sgd_setup("sync", 1), [3, 7], [np.zeros(2), np.ones(1)], None, 0)
    np.testing.assert_array_equal(store.pull([0], 0, 0)[0].flat, [0.0, 0.0, 1.0])


def test_a_killed_server_process_fails_the_pull_promptly() -> None:
    with shard_manager() as (address, authkey):
        manager = ShardManager(address=address, authkey=authkey)
        manager.connect()
        proxy = manager.get_shard(0)
        store = RemoteParameterStore(ManagerGroup([proxy]))
        store.initialize(0, sgd_setup("sync", 2), [3, 7], [np.zeros(2), np.ones(1)], None, 0)
        store.push(0, 0, 0, [3, 7], grads(1.0, 1.0), [True, True], 1, pull_step=1)
        start = time.monotonic()
        (process,) = multiprocessing.active_children()  # the manager's
        threading.Timer(0.3, process.kill).start()
        with pytest.raises(ConnectionError):
            store.pull([0], 0, 1)  # waits in the shard until the process dies
        assert time.monotonic() - start < 10


class Unreachable(ShardServer):
    """A shard whose listener is announced at an address nobody answers (a firewall)."""

    def wire_address(self) -> WireAddress:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        return WireAddress("127.0.0.1", port, b"0" * 16)


def test_an_unreachable_listener_falls_back_to_service_calls() -> None:
    shard = Unreachable(0)
    shard.initialize(sgd_setup("sync", 1), [3, 7], [np.zeros(2), np.ones(1)])
    store = RemoteParameterStore(InProcessGroup([shard]))
    store.push(0, 0, 0, [3, 7], grads(1.0, 2.0), [True, True], 1, pull_step=1)
    reply = store.pull([0], 0, 1)[0]
    np.testing.assert_allclose(reply.flat, [-0.5, -0.5, 0.0])
    assert store.links[0] is None


def test_the_listener_binds_the_node_ip_ray_reports_else_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["default_worker.py", "--node-ip-address=10.1.2.3"])
    assert node_host() == "10.1.2.3"
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert node_host() == "127.0.0.1"
    server = initialized("async", 1)
    assert server.wire_address().host == "127.0.0.1"
    assert server.wire_address() == server.wire_address()  # one listener per shard
