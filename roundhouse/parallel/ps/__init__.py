"""The parameter server: shards, the store protocol, and the in-process store.

Only the `ps` strategy uses this package; `roundhouse.cluster.ps` runs `ShardServer` as Ray
actors behind the same `ParameterStore` protocol.
"""

from roundhouse.parallel.ps.local import LocalParameterStore
from roundhouse.parallel.ps.protocol import ParameterStore
from roundhouse.parallel.ps.server import (
    PullReply,
    ServerNotReadyError,
    ServerResetError,
    ServerSetup,
    ShardServer,
)
from roundhouse.parallel.ps.shard_state import consolidate_states
from roundhouse.parallel.ps.sharding import build_layout, shard_of, used_shards

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
