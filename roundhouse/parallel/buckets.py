"""Gradient buckets launched during the backward pass: ONE hook-driven scheduler for every
strategy that overlaps communication with backward (`BucketScheduler`: the ring's
`OverlappedAllReduce` and the parameter server's pushes, `roundhouse.parallel.ps.client`).

Parameters are grouped, in reverse registration order (roughly the order backward produces
their gradients), into buckets of about `bucket_mb`. A post-accumulate-grad hook counts the
gradients of each bucket; when a bucket is complete it is *launched*: handed to one background
thread that copies its gradients into a flat buffer, averages the buffer over the ranks and
writes the result back, while autograd goes on with earlier layers.

Launch order is the same on every rank, or the ranks' rings would pair different buckets and
hang: buckets are launched strictly in index order (bucket i+1 waits for bucket i even when it
is complete first), and the single thread runs them in that order.

Parameters without a gradient: when backward has returned, `flush()` launches every bucket not
launched yet, reading a missing gradient as zeros. Each bucket also carries one "has a
gradient" flag per parameter; a parameter that had no gradient on *any* rank keeps
`grad=None` (so the optimizer skips it, as on a single device), otherwise it gets the average
with the missing contributions counted as zero, which is the gradient of the global batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Reduce = Callable[[Tensor], Tensor]


@dataclass
class Bucket:
    """Parameters reduced together in one flat buffer: gradients then one flag per parameter."""

    params: list[nn.Parameter]
    pending: int = 0  # gradients still to arrive in the current synchronising backward
    future: Future | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        """Gradient elements in the bucket (its flat buffer adds one flag per parameter)."""
        return sum(p.numel() for p in self.params)

    def pack(self, dtype: torch.dtype) -> Tensor:
        """The flat buffer: every gradient (zeros where missing), then the has-grad flags.

        A sparse gradient (a `sparse=True` embedding) travels dense: the whole table.
        """
        parts = [dense_grad(p) for p in self.params]
        flags = [1.0 if part is not None else 0.0 for part in parts]
        device = self.params[0].device
        buffer = torch.empty(self.numel + len(self.params), dtype=dtype, device=device)
        offset = 0
        for p, part in zip(self.params, parts, strict=True):
            view = buffer[offset : offset + p.numel()]
            view.copy_(part) if part is not None else view.zero_()
            offset += p.numel()
        buffer[offset:].copy_(torch.tensor(flags, dtype=dtype))
        return buffer

    def unpack(self, buffer: Tensor) -> None:
        """Write the averaged gradients back (None where no rank had one)."""
        offset, flags = 0, buffer[self.numel :].tolist()
        for p, flag in zip(self.params, flags, strict=True):
            if flag > 0:
                grad = buffer[offset : offset + p.numel()].view_as(p).to(p.dtype)
                keep = p.grad is not None and not p.grad.is_sparse
                p.grad = p.grad.copy_(grad) if keep else grad
            else:
                p.grad = None
            offset += p.numel()


def dense_grad(p: nn.Parameter) -> Tensor | None:
    """`p`'s gradient flat and dense (None if it has none)."""
    if p.grad is None:
        return None
    grad = p.grad.detach()
    return (grad.to_dense() if grad.is_sparse else grad).reshape(-1)


def build_buckets(params: Sequence[nn.Parameter], bucket_mb: float) -> list[Bucket]:
    """Group `params` in reverse order into buckets of ~`bucket_mb` MiB of one dtype each."""
    limit = bucket_mb * 2**20
    buckets: list[Bucket] = []
    current: list[nn.Parameter] = []
    size = 0
    for p in reversed(list(params)):
        if current and (size >= limit or p.dtype != current[0].dtype):
            buckets.append(Bucket(current))
            current, size = [], 0
        current.append(p)
        size += p.numel() * p.element_size()
    if current:
        buckets.append(Bucket(current))
    return buckets


class BucketScheduler:
    """Launches gradient buckets, strictly in index order, as backward completes them.

    A post-accumulate-grad hook on every parameter counts the gradients of its bucket between
    `begin()` and `flush()`; a complete bucket whose predecessors are launched is handed to
    `launch(index)` (called with the scheduler's lock held, so launches never interleave).
    Backwards outside `begin()`..`flush()` (accumulation micro-steps) launch nothing. One
    background thread (`submit`) runs whatever the launches queue, in order.

    Args:
        params: The parameters whose gradients are bucketed (every rank: same list and order).
        bucket_mb: Target bucket size in MiB.
        launch: Called with a bucket's index when it is launched.
        thread_name: Prefix of the background thread's name.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        bucket_mb: float,
        launch: Callable[[int], None],
        *,
        thread_name: str,
    ) -> None:
        self.buckets = build_buckets(params, bucket_mb)
        self.bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b.params}
        self.launch = launch
        self.lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.next_launch = len(self.buckets)  # nothing to launch outside begin()..flush()
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def begin(self) -> None:
        """The next backward is the synchronising one: count its gradients."""
        with self.lock:
            for bucket in self.buckets:
                bucket.pending, bucket.future = len(bucket.params), None
            self.next_launch = 0

    def _on_grad(self, param: Tensor) -> None:
        with self.lock:
            if self.next_launch >= len(self.buckets):
                return  # an accumulation micro-step, or already flushed
            self.buckets[self.bucket_of[param]].pending -= 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch complete buckets in index order (the lock is held)."""
        while self.next_launch < len(self.buckets):
            if self.buckets[self.next_launch].pending > 0:
                return
            index = self.next_launch
            self.next_launch += 1
            self.launch(index)

    def flush(self) -> None:
        """Backward has returned: launch every bucket still waiting for a gradient."""
        with self.lock:
            for bucket in self.buckets[self.next_launch :]:
                bucket.pending = 0
            self._launch_ready()

    def submit(self, fn: Callable[..., object], *args: object) -> Future:
        """Run `fn(*args)` on the background thread, after everything submitted before."""
        return self.executor.submit(fn, *args)

    def close(self, *, wait: bool) -> None:
        """Remove the hooks and stop the background thread (`wait`: let queued work finish)."""
        for handle in self.handles:
            handle.remove()
        self.executor.shutdown(wait=wait, cancel_futures=not wait)


class OverlappedAllReduce:
    """Averages the gradients of `params` over the ranks, bucket by bucket, during backward.

    Usage per optimizer step: `begin()` before the synchronising backward, `flush()` after it,
    `wait()` before reading the gradients. Backwards outside `begin()`..`flush()` (gradient
    accumulation micro-steps) only accumulate locally.

    Args:
        params: the parameters whose gradients are averaged (all ranks: same list, same order).
        reduce: averages a flat buffer over all ranks, in place (runs on the background thread).
        bucket_mb: target bucket size in MiB.
        accumulate_dtype: the flat buffers' dtype (fp32: gradients are summed in fp32).
        keep_local: keep a copy of each bucket's own gradients, as packed before the exchange,
            until the step is applied (`held`). Live recovery then redoes only a lost peer's
            share of the step (`RingStrategy.hold_gradient`). Once one bucket's exchange
            fails, the rest are only copied, and backward runs to its end.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        reduce: Reduce,
        *,
        bucket_mb: float,
        accumulate_dtype: torch.dtype = torch.float32,
        keep_local: bool = False,
    ) -> None:
        self.reduce = reduce
        self.dtype = accumulate_dtype
        self.keep_local = keep_local
        self.failed: BaseException | None = None  # the step's first failed exchange
        self.scheduler = BucketScheduler(
            params, bucket_mb, self._launch, thread_name="roundhouse-comm"
        )
        self.buckets = self.scheduler.buckets
        self.local: list[Tensor | None] = [None] * len(self.buckets)  # `keep_local` copies
        logger.info(
            "%d gradient buckets: %s elements",
            len(self.buckets),
            [b.numel for b in self.buckets],
        )

    def begin(self) -> None:
        """The next backward is the synchronising one: count its gradients."""
        self.wait()
        self.forget()
        self.scheduler.begin()

    def _launch(self, index: int) -> None:
        if not self.keep_local:  # else backward goes on: its gradients are this rank's share
            self.raise_failed()
        bucket = self.buckets[index]
        bucket.future = self.scheduler.submit(self._reduce_bucket, index)

    def raise_failed(self) -> None:
        """Re-raise the error of a bucket whose exchange already failed (a peer is lost).

        Called at each launch, from inside backward: the backward stops there instead of
        computing gradients that can no longer be exchanged, and live recovery starts a
        backward's worth sooner (a worker killed during the others' forward is noticed at
        their first bucket)."""
        for bucket in self.buckets:
            future = bucket.future
            if future is None or not future.done() or future.cancelled():
                continue
            error = future.exception()
            if error is not None:
                raise error

    def flush(self) -> None:
        """Backward has returned: launch every bucket still waiting for a gradient."""
        self.scheduler.flush()

    def _reduce_bucket(self, index: int) -> None:
        bucket = self.buckets[index]
        buffer = bucket.pack(self.dtype)
        if self.keep_local:
            self.local[index] = buffer.clone()
            if self.failed is not None:  # the group is broken: only keep the copy
                raise self.failed
        try:
            bucket.unpack(self.reduce(buffer))
        except BaseException as exc:
            self.failed = exc
            raise

    def held(self) -> list[tuple[list[nn.Parameter], Tensor]] | None:
        """With `keep_local`, after `close()`: each bucket's parameters and this rank's own
        gradients of the step (as `Bucket.pack` lays them out), or None unless every bucket
        of the step was copied."""
        if not self.keep_local or any(copy is None for copy in self.local):
            return None
        return [(b.params, copy) for b, copy in zip(self.buckets, self.local, strict=True)]  # type: ignore[misc]

    def forget(self) -> None:
        """Drop the copies (the step they belong to was applied, or a new one begins)."""
        self.local = [None] * len(self.buckets)
        self.failed = None

    def wait(self) -> None:
        """Block until every launched bucket is reduced; re-raise a communication error."""
        for bucket in self.buckets:
            future, bucket.future = bucket.future, None
            if future is not None:
                future.result()

    def close(self) -> None:
        """Remove the hooks and stop the background thread (queued buckets run first)."""
        self.scheduler.close(wait=True)


def restore_held(held: list[tuple[list[nn.Parameter], Tensor]], scale: float) -> None:
    """Set each parameter's gradient to `scale` times its held copy (`OverlappedAllReduce.held`;
    None where this rank had none)."""
    for params, copy in held:
        Bucket(params).unpack(copy.mul_(scale))
