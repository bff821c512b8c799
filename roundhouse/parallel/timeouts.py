"""Collective timeouts that end in an error naming the rank and the operation.

A process group's timeout (`cluster.collective_timeout_s`, passed to Ray Train's TorchConfig)
bounds gloo and nccl *collectives*. It does not bound `isend`/`irecv` waits on gloo: a
`work.wait()` without a timeout blocks until the peer dies, so a stalled (not crashed) peer
would hang the ring forever. `wait_work` waits with the group's timeout, and `named_collective`
turns a backend's bare timeout message into a `CollectiveTimeoutError` saying which rank gave
up, in which operation, and (for point-to-point waits) on which peer.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist

from roundhouse.errors import TrainingError

# torch's own default for a process group created without a timeout.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
_TIMEOUT_MARKERS = ("timed out", "timeout")


class CollectiveTimeoutError(TrainingError):
    """A rank waited longer than the collective timeout for its peers."""


def group_timeout(group: dist.ProcessGroup | None = None) -> datetime.timedelta:
    """The timeout `group` (default: the world) was created with."""
    pg = group if group is not None else dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return pg._get_backend(torch.device(device)).options._timeout
        except (RuntimeError, AttributeError):
            continue
    return DEFAULT_TIMEOUT


def is_timeout(exc: BaseException) -> bool:
    """Whether a backend error is a timeout (gloo and nccl say so only in the message)."""
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _TIMEOUT_MARKERS)


def timeout_error(op: str, timeout: datetime.timedelta, peer: int | None) -> CollectiveTimeoutError:
    """The one-line error for rank `dist.get_rank()` giving up on `op`."""
    me = dist.get_rank() if dist.is_initialized() else 0
    waited = f"{timeout.total_seconds():g} s"
    on = f"for rank {peer}" if peer is not None else "for the other ranks"
    return CollectiveTimeoutError(
        f"collective timeout: rank {me} waited {waited} in {op} {on}; "
        f"{'that rank' if peer is not None else 'a rank'} stopped responding (stalled or hung)",
        "find the stalled rank in its log (ranks/rank_<r>.json says where it runs), "
        "or raise cluster.collective_timeout_s for steps that legitimately take longer",
    )


def wait_work(work: dist.Work, *, op: str, peer: int, timeout: datetime.timedelta) -> None:
    """`work.wait()` bounded by `timeout`; a timeout names this rank, `op` and `peer`."""
    try:
        work.wait(timeout)
    except RuntimeError as exc:
        if is_timeout(exc):
            raise timeout_error(op, timeout, peer) from exc
        raise


@contextlib.contextmanager
def named_collective(op: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Re-raise a backend timeout inside the block as a `CollectiveTimeoutError` naming `op`."""
    try:
        yield
    except RuntimeError as exc:
        if is_timeout(exc):
            raise timeout_error(op, group_timeout(group), None) from exc
        raise
