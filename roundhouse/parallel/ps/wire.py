"""The parameter server's data path: dense pushes and pulls over one TCP socket per shard.

A Ray actor call that carries a model's gradients out and its parameters back costs several
times an empty call (pickling, the object store, the scheduler's bookkeeping: ~4.9 ms against
0.6 ms for LeNet's 546 KB each way, docs/guide/sparse-ps.md). So the hot path bypasses Ray: a
`ShardServer` opens a `WireListener` on demand (`ShardServer.wire_address`, asked once through
the ordinary service call) and every worker keeps one `WireConnection` per shard. Control
calls (initialize, checkpoints, claims, row tables) stay service calls.

Framing (little endian). A connection starts with the client's `MAGIC`, the protocol version
and the listener's 16-byte token (a random secret handed out with the address: it both
authenticates the client and proves it reached the right server), answered by `MAGIC` and a
status byte. Then requests and replies alternate strictly in order on the connection:

- request: `_REQUEST` header (op, pusher, step, weight, pull step or -1, number of indices,
  payload bytes), then for a push the indices (int64), their presence flags (uint8) and the
  gradients (float32, raw);
- reply: `_REPLY` header (kind, version, lr, squared gradient norm, whether it has one, ahead,
  payload bytes), then for a pull reply the parameters (float32, raw), for an error a UTF-8
  JSON object `{"type", "message"}`, for a push's acknowledgement nothing.

Big arrays are never pickled: they are read with `recv_into` straight into the numpy array
that the server then uses (a push's gradients) or that the worker gets (a pull's parameters).
A closed connection raises `WireClosedError` at once; dead hosts are found by TCP keepalive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MAGIC = b"RHPS"
VERSION = 1
TOKEN_BYTES = 16
OP_PUSH, OP_PULL = 1, 2
REPLY_ACK, REPLY_PULL, REPLY_ERROR = 1, 2, 3
_HELLO = struct.Struct(f"<4sB{TOKEN_BYTES}s")
_WELCOME = struct.Struct("<4sB")
_REQUEST = struct.Struct("<BqqqqqQ")
_REPLY = struct.Struct("<BqddBqQ")
NODE_IP_FLAG = "--node-ip-address="
CONNECT_TIMEOUT_S = 5.0
# A reply may legitimately take as long as a sync pull waits for the slowest worker (the
# server fails such a pull itself after `ServerSetup.timeout_s`); this only bounds a server
# that stopped answering without closing the connection.
REPLY_TIMEOUT_S = 900.0


class WireClosedError(ConnectionError):
    """The connection to a shard closed or broke (the server died or restarted)."""


class WireRemoteError(RuntimeError):
    """A shard failed a request with an exception this side has no class for."""


@dataclass(frozen=True)
class WireAddress:
    """Where a shard listens, and the token a client must present."""

    host: str
    port: int
    token: bytes


@dataclass
class WireReply:
    """A decoded reply: a pull's parameters and fields (`flat` None for an acknowledgement)."""

    flat: np.ndarray | None
    version: int = 0
    lr: float = 0.0
    grad_sq_norm: float | None = None
    ahead: int = 0


# --- framing --------------------------------------------------------------------------------


def recv_into(sock: socket.socket, buffer: memoryview) -> None:
    """Fill `buffer` from `sock`; `WireClosedError` if the peer closes first."""
    view = buffer.cast("B") if buffer.format != "B" else buffer
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise WireClosedError("connection closed by the peer")
        got += n


def recv_exact(sock: socket.socket, size: int) -> bytes:
    """`size` bytes from `sock` (see `recv_into`)."""
    buffer = bytearray(size)
    recv_into(sock, memoryview(buffer))
    return bytes(buffer)


def recv_array(sock: socket.socket, nbytes: int, dtype: Any) -> np.ndarray:
    """A new array of `nbytes` of `dtype` read straight from `sock`."""
    array = np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
    recv_into(sock, memoryview(array))
    return array


def send_buffers(sock: socket.socket, buffers: list[Any]) -> None:
    """Send every buffer in order, in as few system calls as the kernel allows."""
    views = [memoryview(b).cast("B") for b in buffers if len(memoryview(b).cast("B"))]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _tune(sock: socket.socket) -> None:
    """No Nagle delay (a header and its payload go out at once); keepalive finds dead peers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def node_host() -> str:
    """The address this machine has in its cluster: the IP Ray reports for the node (Ray
    starts its worker processes, actors included, with `--node-ip-address=`; 127.0.0.1 for
    roundhouse's embedded single-machine cluster), or loopback outside Ray."""
    for arg in sys.argv:
        if arg.startswith(NODE_IP_FLAG):
            return arg[len(NODE_IP_FLAG) :]
    return "127.0.0.1"


# --- server side ----------------------------------------------------------------------------


class WireListener:
    """Serves one shard's pushes and pulls, one thread per connection.

    Args:
        handler: The shard: `push(pusher, step, indices, flat, present, weight, pull_step)`
            and `pull(pusher, step)`, returning a reply with `flat, version, lr,
            grad_sq_norm, ahead` (or None for a push without `pull_step`).
        host: The address to listen at (`node_host()` by default).
    """

    def __init__(self, handler: Any, host: str | None = None) -> None:
        self.handler = handler
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.host = host or node_host()
        self.sock = socket.create_server((self.host, 0), backlog=128)
        self.closed = False
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, name="roundhouse-ps-wire", daemon=True).start()

    @property
    def address(self) -> WireAddress:
        """Where clients connect (`WireConnection`)."""
        return WireAddress(self.host, self.sock.getsockname()[1], self.token)

    def close(self) -> None:
        """Stop listening and drop every connection (their clients get `WireClosedError`)."""
        self.closed = True
        with self.lock:
            conns, self.connections = list(self.connections), set()
        for sock in [self.sock, *conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            _tune(conn)
            with self.lock:
                self.connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            magic, version, token = _HELLO.unpack(recv_exact(conn, _HELLO.size))
            ok = magic == MAGIC and version == VERSION and secrets.compare_digest(token, self.token)
            conn.sendall(_WELCOME.pack(MAGIC, int(ok)))
            while ok:
                self._answer(conn, *_REQUEST.unpack(recv_exact(conn, _REQUEST.size)))
        except OSError:
            pass  # the client went away (or we closed): nothing to answer
        finally:
            with self.lock:
                self.connections.discard(conn)
            conn.close()

    def _answer(self, conn: socket.socket, op: int, *fields: int) -> None:
        pusher, step, weight, pull_step, num_indices, nbytes = fields
        if op == OP_PUSH:  # read the whole request before the shard may refuse it
            indices = recv_array(conn, 8 * num_indices, np.int64).tolist()
            present = recv_array(conn, num_indices, np.uint8).astype(bool).tolist()
            flat = recv_array(conn, nbytes, np.float32)
        try:
            if op == OP_PUSH:
                ask = None if pull_step < 0 else pull_step
                reply = self.handler.push(pusher, step, indices, flat, present, weight, ask)
            elif op == OP_PULL:
                reply = self.handler.pull(pusher, step)
            else:
                raise ValueError(f"unknown ps wire request {op}")
        except Exception as error:  # the shard refused: tell the worker, keep serving
            send_buffers(conn, encode_error(error))
            return
        send_buffers(conn, encode_reply(reply))


def encode_error(error: Exception) -> list[Any]:
    """The buffers of an error reply naming `error`'s class and message."""
    message = json.dumps({"type": type(error).__name__, "message": str(error)}).encode()
    return [_REPLY.pack(REPLY_ERROR, 0, 0.0, 0.0, 0, 0, len(message)), message]


def encode_reply(reply: Any) -> list[Any]:
    """The buffers of a push's acknowledgement (`reply` None) or of a pull's reply."""
    if reply is None:
        return [_REPLY.pack(REPLY_ACK, 0, 0.0, 0.0, 0, 0, 0)]
    flat = np.ascontiguousarray(reply.flat, dtype=np.float32)
    norm = reply.grad_sq_norm
    header = _REPLY.pack(
        REPLY_PULL,
        reply.version,
        reply.lr,
        0.0 if norm is None else norm,
        int(norm is not None),
        reply.ahead,
        flat.nbytes,
    )
    return [header, flat]


# --- client side ----------------------------------------------------------------------------


class WireConnection:
    """One worker's connection to one shard: send requests, read their replies in order.

    Args:
        address: The shard's `WireAddress`.
        errors: Exception classes by name, to re-raise a shard's failures as themselves
            (others become `WireRemoteError`).

    Raises:
        ConnectionError: nothing answered at `address` as the shard.
    """

    def __init__(self, address: WireAddress, errors: dict[str, type] | None = None) -> None:
        self.errors = dict(errors or {})
        self.sock = _connect(address)

    def send_push(
        self,
        pusher: int,
        step: int,
        indices: list[int],
        flat: np.ndarray,
        present: list[bool],
        weight: int,
        pull_step: int | None,
    ) -> None:
        """Send gradients (the reply, an acknowledgement or the pull, is read later)."""
        flat = np.ascontiguousarray(flat, dtype=np.float32)
        ask = -1 if pull_step is None else pull_step
        header = _REQUEST.pack(OP_PUSH, pusher, step, weight, ask, len(indices), flat.nbytes)
        index_bytes = np.asarray(indices, dtype=np.int64)
        flags = np.asarray(present, dtype=np.uint8)
        self._send([header, index_bytes, flags, flat])

    def send_pull(self, pusher: int, step: int) -> None:
        """Ask for the parameters of `step` (read the reply with `read_reply`)."""
        self._send([_REQUEST.pack(OP_PULL, pusher, step, 0, -1, 0, 0)])

    def _send(self, buffers: list[Any]) -> None:
        try:
            send_buffers(self.sock, buffers)
        except OSError as error:
            raise WireClosedError(f"sending to a parameter server failed: {error}") from error

    def read_reply(self) -> WireReply:
        """The reply to the oldest unread request; re-raises the shard's failure."""
        try:
            header = _REPLY.unpack(recv_exact(self.sock, _REPLY.size))
            kind, version, lr, sq_norm, has_norm, ahead, nbytes = header
            payload = recv_array(self.sock, nbytes, np.float32 if kind == REPLY_PULL else np.uint8)
        except OSError as error:
            if isinstance(error, WireClosedError):
                raise
            raise WireClosedError(f"reading from a parameter server failed: {error}") from error
        if kind == REPLY_ERROR:
            failure = json.loads(payload.tobytes())
            raise self.errors.get(failure["type"], WireRemoteError)(failure["message"])
        if kind == REPLY_ACK:
            return WireReply(None)
        return WireReply(payload, version, lr, sq_norm if has_norm else None, ahead)

    def close(self) -> None:
        """Close the socket (replies not read are lost)."""
        self.sock.close()


def _connect(address: WireAddress) -> socket.socket:
    """A connected, greeted socket to the shard at `address`."""
    target = (address.host, address.port)
    try:
        sock = socket.create_connection(target, CONNECT_TIMEOUT_S)
    except OSError as error:
        raise ConnectionError(f"no parameter server answered at {target}: {error}") from error
    return _greet(sock, address)


def _greet(sock: socket.socket, address: WireAddress) -> socket.socket:
    try:
        _tune(sock)
        sock.sendall(_HELLO.pack(MAGIC, VERSION, address.token))
        magic, ok = _WELCOME.unpack(recv_exact(sock, _WELCOME.size))
        if magic != MAGIC or not ok:
            raise ConnectionRefusedError("not the parameter server shard asked for")
        sock.settimeout(REPLY_TIMEOUT_S)
        return sock
    except BaseException:
        sock.close()
        raise
