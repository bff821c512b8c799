"""Ring all-reduce on torch.distributed point-to-point operations.

The classic bandwidth-optimal algorithm: a 1-D buffer is cut into N near-equal chunks (N = the
group's size). In N-1 *reduce-scatter* steps every rank sends one chunk to its right neighbour
and adds the chunk it receives from its left neighbour, so that afterwards rank r holds the
complete sum of chunk (r + 1) mod N. In N-1 *all-gather* steps the finished chunks travel round
the ring once more. Each rank sends and receives 2(N-1)/N of the buffer, whatever N is.

Only `isend`/`irecv` are used, so the same code runs on gloo (CPU) and nccl (GPU).
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch import Tensor

from roundhouse.parallel.timeouts import group_timeout, wait_work

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
    _Ring(group, acc, wire_dtype or tensor.dtype, average).run()
    if acc is not tensor:
        tensor.copy_(acc)
    return tensor


class _Ring:
    """One all-reduce in progress: this rank's neighbours and the chunks of its buffer.

    The 2(N-1) steps are pipelined segment by segment: what a rank receives in step s is
    exactly what it sends in step s+1 (the chunk it just added to, or just got), so segment k
    goes out again as soon as it has landed and been combined, while later segments of step s
    are still in flight. The reduce-scatter's last step thus feeds the all-gather without a
    barrier between the phases. Sends and receives between two neighbours are posted in the
    same order on both sides, which is what matches them (one tag, FIFO).
    """

    def __init__(
        self, group: ProcessGroup, acc: Tensor, wire_dtype: torch.dtype, average: bool
    ) -> None:
        self.group, self.acc, self.wire_dtype, self.average = group, acc, wire_dtype, average
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.right = _global_rank(group, (self.rank + 1) % self.size)
        self.left = _global_rank(group, (self.rank - 1) % self.size)
        self.chunks = list(torch.tensor_split(acc, self.size))
        self.sends: list[tuple[dist.Work, Tensor]] = []
        self.timeout = group_timeout(group)  # gloo's p2p waits do not apply it by themselves

    def chunk_received(self, step: int) -> int:
        """Index of the chunk that arrives from the left in `step` (sent on in `step + 1`)."""
        if step < self.size - 1:  # reduce-scatter
            return (self.rank - step - 1) % self.size
        return (self.rank - (step - self.size + 1)) % self.size  # all-gather

    def run(self) -> None:
        num_steps = 2 * (self.size - 1)
        first = self.chunks[self.rank]  # step 0 sends this rank's own chunk
        for seg in _segments(first, self.wire_dtype):
            self.send(seg.to(self.wire_dtype))
        recvs = [self.post_recv(0, k) for k in range(self.num_segments(0))]
        for step in range(num_steps):
            last = step + 1 == num_steps
            upcoming = 0 if last else self.num_segments(step + 1)
            nxt: list = []
            for target, incoming, work in recvs:
                wait_work(work, op="ring all-reduce (recv)", peer=self.left, timeout=self.timeout)
                wire = self.combine(step, target, incoming)
                if not last:
                    self.send(wire)
                    if len(nxt) < upcoming:
                        nxt.append(self.post_recv(step + 1, len(nxt)))
            # Neighbouring chunks may differ by one element, hence by one segment.
            nxt += [self.post_recv(step + 1, k) for k in range(len(nxt), upcoming)]
            recvs = nxt
        for work, _segment in self.sends:
            wait_work(work, op="ring all-reduce (send)", peer=self.right, timeout=self.timeout)

    def combine(self, step: int, target: Tensor, incoming: Tensor) -> Tensor:
        """Merge one received segment into the buffer; return what to send on (wire dtype)."""
        reduce_scatter = step < self.size - 1
        if reduce_scatter:
            target.add_(incoming)
            if step < self.size - 2:
                return target.to(self.wire_dtype)
            # The last reduce-scatter step completes this rank's own chunk: scale it, and round
            # it through the wire dtype as every other rank will receive it, so all replicas
            # hold identical values.
            if self.average:
                target.div_(self.size)
            wire = target.to(self.wire_dtype)
            if wire is not target:
                target.copy_(wire)
            return wire
        if incoming is target:
            return target
        target.copy_(incoming)
        # Not `incoming`: that scratch memory receives again two steps on, maybe mid-send.
        return target.to(self.wire_dtype)

    def num_segments(self, step: int) -> int:
        return len(_segments(self.chunks[self.chunk_received(step)], self.wire_dtype))

    def post_recv(self, step: int, index: int) -> tuple[Tensor, Tensor, dist.Work]:
        """Receive segment `index` of step `step`: straight into the buffer when possible."""
        target = _segments(self.chunks[self.chunk_received(step)], self.wire_dtype)[index]
        if step >= self.size - 1 and target.dtype == self.wire_dtype:
            incoming = target
        else:  # two scratch buffers: step s+1 is posted while step s is still landing
            scratch = _scratch(step % 2, len(self.chunks[0]), self.wire_dtype, self.acc.device)
            chunk = self.chunks[self.chunk_received(step)]
            incoming = _segments(scratch[: len(chunk)], self.wire_dtype)[index]
        return target, incoming, dist.irecv(incoming, self.left, group=self.group)

    def send(self, segment: Tensor) -> None:
        # A wire-dtype copy must stay alive until its send completes: keep it with the work.
        self.sends.append((dist.isend(segment, self.right, group=self.group), segment))


_local = threading.local()


def _scratch(slot: int, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reusable receive buffer of at least `numel` (per thread, slot, dtype and device).

    Fresh multi-megabyte allocations are returned to the OS when freed, so every all-reduce
    would page-fault its receive buffers in again: ~10% of a 64 MB all-reduce's time here.
    """
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (slot, dtype, device)
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffers[key]


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
