"""`free_port`: a TCP port free on loopback right now (process groups, test servers)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at `host` at the time of the call.

    The port is released before returning, so another process may take it first; callers bind
    it soon after (a process group's rendezvous, a test server).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
