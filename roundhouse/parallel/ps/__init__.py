"""The parameter server: shards, the store protocol, and the in-process store.

Only the `ps` strategy uses this package. Its servers are a driver-side service
(`remote.server_spec`): `roundhouse.cluster.services` runs `ShardServer` as Ray actors, and
`remote.RemoteParameterStore` reaches them behind the same `ParameterStore` protocol.

The package loads lazily: the job schema imports its torch-free `section.py`, which runs this
`__init__` first, so the names below (which import torch) load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LocalParameterStore",
    "ParameterStore",
    "PullReply",
    "ServerNotReadyError",
    "ServerResetError",
    "ServerSetup",
    "ShardServer",
    "build_layout",
    "consolidate_states",
    "shard_of",
    "used_shards",
]
_SERVER = ("PullReply", "ServerNotReadyError", "ServerResetError", "ServerSetup", "ShardServer")


def __getattr__(name: str) -> Any:
    """The names of `__all__`, imported on first use (PEP 562)."""
    if name == "LocalParameterStore":
        from roundhouse.parallel.ps import local as module
    elif name == "ParameterStore":
        from roundhouse.parallel.ps import protocol as module
    elif name in _SERVER:
        from roundhouse.parallel.ps import server as module
    elif name == "consolidate_states":
        from roundhouse.parallel.ps import shard_state as module
    elif name in ("build_layout", "shard_of", "used_shards"):
        from roundhouse.parallel.ps import sharding as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
