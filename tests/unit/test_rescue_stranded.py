"""`rescue_stranded`: the driver's decision when the last training worker of a live group is
lost while others wait to join (a store only; the process-level case is in
`tests/distributed/test_live_recovery.py`)."""

from __future__ import annotations

import json

import torch.distributed as dist

from roundhouse.parallel.rendezvous import rescue_stranded


def waiting(store: dist.Store, member: int, holds: int) -> None:
    """What `ElasticGroup.join` writes before it waits for admission."""
    slot = store.add("join/count", 1)
    store.set(f"join/slot/{slot}", str(member))
    store.set(f"join/{member}/holds", str(holds))
    store.set(f"join/{member}/waiting", "1")


def test_a_training_worker_alive_means_nothing_to_do() -> None:
    store = dist.HashStore()
    waiting(store, 3, -1)
    assert rescue_stranded(store, [0, 3]) is None  # worker 0 still trains: it admits 3
    assert rescue_stranded(store, []) is None


def test_only_fresh_replacements_left_means_a_restart() -> None:
    store = dist.HashStore()
    waiting(store, 3, -1)
    waiting(store, 4, -1)
    assert rescue_stranded(store, [3, 4]) == []
    assert not store.check(["join/3/gen"])  # nobody was admitted


def test_the_newest_state_leads_the_waiting_workers() -> None:
    store = dist.HashStore()
    store.set("gen1/members", "[0, 2]")  # generations the lost members formed
    store.set("gen2/members", "[0]")
    waiting(store, 3, -1)
    waiting(store, 1, 7)
    waiting(store, 2, 9)
    assert rescue_stranded(store, [1, 2, 3]) == [2, 1, 3]
    assert json.loads(store.get("gen3/members")) == [2, 1, 3]
    assert store.check(["gen3/rescue"])
    assert [int(store.get(f"join/{m}/gen")) for m in (1, 2, 3)] == [3, 3, 3]
    assert store.add("join/admitted", 0) == 3  # rank 0 of gen 3 finds no joiner pending
    # Until they pick their admission up, they are not stranded again (no second group).
    assert rescue_stranded(store, [1, 2, 3]) is None
