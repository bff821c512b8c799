"""A stalled peer becomes an error naming the rank and the operation, within the group timeout."""

from __future__ import annotations

import datetime
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.dist import run_distributed

TIMEOUT_S = 3


def stalled_ring(rank: int, world_size: int) -> dict:
    """Rank 1 joins the group, then stops responding; rank 0 runs a ring all-reduce on it."""
    from roundhouse.parallel.ring.collectives import ring_all_reduce_
    from roundhouse.parallel.timeouts import CollectiveTimeoutError, group_timeout

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        time.sleep(TIMEOUT_S + 2)  # stalled, not dead: gloo's p2p waits alone would block
        return {}
    started = time.monotonic()
    try:
        ring_all_reduce_(torch.ones(1000), group=group)
    except CollectiveTimeoutError as exc:
        return {"error": str(exc), "elapsed": time.monotonic() - started}
    return {"timeout": group_timeout(group).total_seconds()}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ring_names_the_stalled_peer_within_the_group_timeout() -> None:
    result = run_distributed(stalled_ring, 2, 60)[0]
    assert "error" in result, result
    assert TIMEOUT_S - 0.5 <= result["elapsed"] < TIMEOUT_S + 3
    assert "rank 0 waited 3 s in ring all-reduce (recv) for rank 1" in result["error"]


def named_allreduce(rank: int, world_size: int) -> str:
    from roundhouse.parallel.timeouts import CollectiveTimeoutError, named_collective

    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT_S))
    if rank == 1:
        time.sleep(TIMEOUT_S + 2)
        return ""
    try:
        with named_collective("all_reduce (finite-loss check)", group):
            dist.all_reduce(torch.ones(1), group=group)
    except CollectiveTimeoutError as exc:
        return str(exc)
    return "no error"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_collective_timeout_names_the_operation() -> None:
    message = run_distributed(named_allreduce, 2, 60)[0]
    assert message.startswith("collective timeout: rank 0 waited 3 s in all_reduce (finite-loss")
