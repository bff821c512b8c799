"""Gradient communication for data parallelism: the ring all-reduce, buckets, node layouts.

The package loads lazily: the job schema imports its torch-free `section.py`, which runs this
`__init__` first, so the names below (which import `torch.distributed`) load on first use.
Only trainer strategies use them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "GradientReducer",
    "NodeGroups",
    "OverlappedAllReduce",
    "build_buckets",
    "build_node_groups",
    "native_all_reduce_",
    "ring_all_reduce_",
]


def __getattr__(name: str) -> Any:
    """The names of `__all__`, imported on first use (PEP 562)."""
    if name in ("OverlappedAllReduce", "build_buckets"):
        from roundhouse.parallel import buckets as module
    elif name in ("native_all_reduce_", "ring_all_reduce_"):
        from roundhouse.parallel.ring import collectives as module
    elif name in ("GradientReducer", "NodeGroups", "build_node_groups"):
        from roundhouse.parallel.ring import reducer as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(module, name)
