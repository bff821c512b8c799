"""Ring all-reduce on torch.distributed point-to-point operations.

The classic bandwidth-optimal algorithm: a 1-D buffer is cut into N near-equal chunks (N = the
group's size). In N-1 *reduce-scatter* steps every rank sends one chunk to its right neighbour
and adds the chunk it receives from its left neighbour, so that afterwards rank r holds the
complete sum of chunk (r + 1) mod N. In N-1 *all-gather* steps the finished chunks travel round
the ring once more. Each rank sends and receives 2(N-1)/N of the buffer, whatever N is.

Only `isend`/`irecv` are used, so the same code runs on gloo (CPU) and nccl (GPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup | None

# Messages are cut into segments so the reduction of one overlaps the transfer of the next;
# a few MB keeps per-message overhead negligible.
SEGMENT_BYTES = 4 * 2**20

# Low-precision buffers are summed in fp32: adding N bf16 values in bf16 loses ~log2(N) bits.
_ACCUMULATE_IN_FP32 = (torch.float16, torch.bfloat16)


def ring_all_reduce_(
    tensor: Tensor,
    *,
    group: ProcessGroup = None,
    average: bool = True,
    wire_dtype: torch.dtype | None = None,
) -> Tensor:
    """Sum (or average) a 1-D contiguous `tensor` over `group`, in place, with a ring.

    Args:
        tensor: this rank's contribution; overwritten with the result. Any length (chunks
            need not divide evenly; lengths below the group size leave some chunks empty).
        group: the process group (None: the default group).
        average: divide the sum by the group size.
        wire_dtype: the dtype sent over the network (default: `tensor.dtype`). Received values
            are added in fp32 or `tensor.dtype`, whichever is wider.

    Returns:
        `tensor`, holding the same values on every rank of the group (bit for bit).
    """
    assert tensor.dim() == 1 and tensor.is_contiguous(), "ring_all_reduce_ needs a flat buffer"
    size = dist.get_world_size(group)
    if size == 1:
        return tensor
    acc = tensor.float() if tensor.dtype in _ACCUMULATE_IN_FP32 else tensor
    ring = _Ring(group, acc, wire_dtype or tensor.dtype)
    ring.reduce_scatter()
    ring.finish_own_chunk(average)
    ring.all_gather()
    if acc is not tensor:
        tensor.copy_(acc)
    return tensor


class _Ring:
    """One all-reduce in progress: this rank's neighbours and the chunks of its buffer."""

    def __init__(self, group: ProcessGroup, acc: Tensor, wire_dtype: torch.dtype) -> None:
        self.group, self.acc, self.wire_dtype = group, acc, wire_dtype
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.right = _global_rank(group, (self.rank + 1) % self.size)
        self.left = _global_rank(group, (self.rank - 1) % self.size)
        self.chunks = list(torch.tensor_split(acc, self.size))

    def reduce_scatter(self) -> None:
        for step in range(self.size - 1):
            send = (self.rank - step) % self.size
            recv = (self.rank - step - 1) % self.size
            self._exchange(send, recv, combine=torch.Tensor.add_)

    def finish_own_chunk(self, average: bool) -> None:
        """Scale the chunk this rank completed, rounded as the other ranks will receive it."""
        own = self.chunks[(self.rank + 1) % self.size]
        if average:
            own.div_(self.size)
        if self.wire_dtype != own.dtype:
            # Everybody else gets this chunk through the wire dtype; round ours the same way so
            # that all replicas hold identical values.
            own.copy_(own.to(self.wire_dtype))

    def all_gather(self) -> None:
        for step in range(self.size - 1):
            send = (self.rank + 1 - step) % self.size
            recv = (self.rank - step) % self.size
            self._exchange(send, recv, combine=torch.Tensor.copy_)

    def _exchange(self, send: int, recv: int, combine: Callable[[Tensor, Tensor], Tensor]) -> None:
        """Send chunk `send` right while receiving chunk `recv` from the left, segment by segment.

        All segments are posted at once and each received one is combined (added or copied)
        as soon as it lands, so the arithmetic overlaps the rest of the transfer. Chunk sizes
        are known on both sides, so an empty chunk is skipped by both.
        """
        outgoing = _segments(self.chunks[send].to(self.wire_dtype), self.wire_dtype)
        target = self.chunks[recv]
        direct = combine is torch.Tensor.copy_ and target.dtype == self.wire_dtype
        incoming = target if direct else torch.empty_like(target, dtype=self.wire_dtype)
        recvs = [
            dist.irecv(seg, self.left, group=self.group)
            for seg in _segments(incoming, self.wire_dtype)
        ]
        sends = [dist.isend(seg, self.right, group=self.group) for seg in outgoing]
        for work, dst, seg in zip(
            recvs, *(_segments(t, self.wire_dtype) for t in (target, incoming)), strict=True
        ):
            work.wait()
            if not direct:
                combine(dst, seg)
        for work in sends:
            work.wait()


def _segments(tensor: Tensor, wire_dtype: torch.dtype) -> list[Tensor]:
    """Consecutive views of at most SEGMENT_BYTES on the wire (none for an empty tensor).

    Sized by the wire dtype, so a buffer and its wire copy split at the same elements.
    """
    step = max(1, SEGMENT_BYTES // torch.empty((), dtype=wire_dtype).element_size())
    return list(torch.split(tensor, step)) if tensor.numel() else []


def _global_rank(group: ProcessGroup, group_rank: int) -> int:
    """isend/irecv address peers by global rank, whatever group they run on."""
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def native_all_reduce_(
    tensor: Tensor,
    *,
    group: ProcessGroup = None,
    average: bool = True,
    wire_dtype: torch.dtype | None = None,
) -> Tensor:
    """The library baseline with `ring_all_reduce_`'s contract: `dist.all_reduce` (SUM)."""
    if dist.get_world_size(group) == 1:
        return tensor
    wire = tensor if wire_dtype in (None, tensor.dtype) else tensor.to(wire_dtype)
    dist.all_reduce(wire, group=group)
    if wire is not tensor:
        tensor.copy_(wire)
    if average:
        tensor.div_(dist.get_world_size(group))
    return tensor
