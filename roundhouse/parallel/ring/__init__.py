"""Gradient communication for data parallelism: the ring all-reduce, buckets, node layouts.

Imports `torch.distributed`; only trainer strategies use this package.
"""

from roundhouse.trainer.comm.buckets import OverlappedAllReduce, build_buckets
from roundhouse.trainer.comm.reducer import GradientReducer, NodeGroups, build_node_groups
from roundhouse.trainer.comm.ring import native_all_reduce_, ring_all_reduce_

__all__ = [
    "GradientReducer",
    "NodeGroups",
    "OverlappedAllReduce",
    "build_buckets",
    "build_node_groups",
    "native_all_reduce_",
    "ring_all_reduce_",
]
