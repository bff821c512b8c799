"""The parameter server: shards, the store protocol, and the in-process store.

Only the `ps` strategy uses this package. Its servers are a driver-side service
(`remote.server_spec`): `roundhouse.cluster.services` runs `ShardServer` as Ray actors, and
`remote.RemoteParameterStore` reaches them behind the same `ParameterStore` protocol.
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
