"""Gradient communication for data parallelism: the ring all-reduce, buckets, node layouts.

Imports `torch.distributed`; only trainer strategies use this package.
"""

from roundhouse.parallel.buckets import OverlappedAllReduce, build_buckets
from roundhouse.parallel.ring.collectives import native_all_reduce_, ring_all_reduce_
from roundhouse.parallel.ring.reducer import GradientReducer, NodeGroups, build_node_groups

__all__ = [
    "GradientReducer",
    "NodeGroups",
    "OverlappedAllReduce",
    "build_buckets",
    "build_node_groups",
    "native_all_reduce_",
    "ring_all_reduce_",
]
