"""`GradientReducer`: averages a flat buffer over all ranks, flat or node-hierarchical.

Flat: one all-reduce over every rank. Hierarchical: the ranks of each node reduce to their
node's leader (local rank 0) over the fast intra-node links, the leaders average among
themselves, and each leader broadcasts the result back inside its node. Only `num_nodes`
ranks then cross the (slower) network, each with the whole buffer once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from roundhouse.parallel.ring.collectives import native_all_reduce_, ring_all_reduce_
from roundhouse.parallel.timeouts import group_timeout, named_collective

logger = logging.getLogger(__name__)

AllReduce = Callable[..., Tensor]
ALGORITHMS: dict[str, AllReduce] = {"ring": ring_all_reduce_, "native": native_all_reduce_}


@dataclass
class NodeGroups:
    """The process groups of a hierarchical layout, as seen from one rank."""

    node: dist.ProcessGroup  # this rank's node
    leaders: dist.ProcessGroup | None  # the node leaders; None on non-leaders
    leader: int  # global rank of this node's leader


def build_node_groups(node_rank: int, local_rank: int) -> NodeGroups:
    """Create every node group and the leader group; a collective call on all ranks.

    Every rank must call `dist.new_group` for every group in the same order, so the layout is
    first exchanged (each rank's `(node_rank, local_rank)` from its `WorkerContext`).
    """
    layout: list[tuple[int, int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(layout, (node_rank, local_rank))
    nodes: dict[int, list[int]] = {}
    # Within a node, ranks in local-rank order: local rank 0 leads.
    for rank, (node, _local) in sorted(enumerate(layout), key=lambda x: (x[1], x[0])):
        nodes.setdefault(node, []).append(rank)
    mine = None
    for node in sorted(nodes):
        group = dist.new_group(nodes[node], timeout=group_timeout())
        if node == node_rank:
            mine = group
    leader_ranks = [nodes[node][0] for node in sorted(nodes)]
    leaders = dist.new_group(leader_ranks, timeout=group_timeout())
    me = dist.get_rank()
    logger.debug("node groups %s, leaders %s", nodes, leader_ranks)
    assert mine is not None
    return NodeGroups(mine, leaders if me in leader_ranks else None, nodes[node_rank][0])


class GradientReducer:
    """Averages flat buffers over all ranks with the chosen algorithm and layout.

    Args:
        algorithm: `ring` (ours) or `native` (`dist.all_reduce`).
        wire_dtype: dtype on the network (None: the buffer's own).
        group: flat layout: the group to reduce over (None: default group).
        node_groups: hierarchical layout (overrides `group`).
    """

    def __init__(
        self,
        algorithm: str,
        *,
        wire_dtype: torch.dtype | None = None,
        group: dist.ProcessGroup | None = None,
        node_groups: NodeGroups | None = None,
    ) -> None:
        self.all_reduce = ALGORITHMS[algorithm]
        self.wire_dtype = wire_dtype
        self.group = group
        self.node_groups = node_groups
        self.world_size = dist.get_world_size()

    def __call__(self, buffer: Tensor) -> Tensor:
        """Replace `buffer` (flat, contiguous) with its average over all ranks."""
        with named_collective("gradient all-reduce", self.group):
            return self._average(buffer)

    def _average(self, buffer: Tensor) -> Tensor:
        if self.node_groups is None:
            return self.all_reduce(buffer, group=self.group, wire_dtype=self.wire_dtype)
        groups = self.node_groups
        dist.reduce(buffer, groups.leader, group=groups.node)
        if groups.leaders is not None:
            self.all_reduce(buffer, group=groups.leaders, average=False, wire_dtype=self.wire_dtype)
            buffer.div_(self.world_size)
        dist.broadcast(buffer, groups.leader, group=groups.node)
        return buffer
