"""`cluster.recovery: live` under `strategy.kind: ps` (sync): 3 spawned ranks on a shared
TCPStore, the shards in a manager process (`ps/manager.py`); one rank is SIGKILLed mid-step.
The servers keep the parameters, the sync round shrinks to the survivors, who redo the step
with the lost rank's share; a replacement joins at a step boundary and pulls the parameters
from the servers. The ledger shows every sample once and the weights equal an uninterrupted
run's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.parallel.ps import ServerResetError, ServerSetup, ShardServer
from roundhouse.parallel.ps.resize import pusher_tag
from roundhouse.runs.ledger import verify_ledger
from roundhouse.runs.rundir import RunDir
from roundhouse.trainer.live_recovery import is_peer_loss
from roundhouse.trainer.preflight import preflight
from tests.distributed.test_live_recovery import (
    assert_close_weights,
    assert_went_3_2_3,
    make_job,
    train,
)


def ps_job(storage: Path, at_call: int, **strategy: object) -> dict:
    job = make_job(storage, at_call)
    job["strategy"] = {"kind": "ps", "mode": "sync", "num_servers": 2, **strategy}
    return job


def test_ps_survivors_redo_the_step_on_the_servers_and_lose_no_sample(tmp_path: Path) -> None:
    reference, _ = train(ps_job(tmp_path / "whole", at_call=0), set())
    run, survivors = train(ps_job(tmp_path / "killed", at_call=5), {2})
    assert sorted(survivors) == [0, 1]
    for generation, world, _ in survivors.values():
        assert (generation, world) == (1, 2)
    report = verify_ledger(RunDir(str(run)))
    assert report.ok, report.as_dict()
    assert report.epochs[0].steps == 12
    assert_close_weights(run, reference)


def test_ps_replacement_joins_and_pulls_from_the_servers(tmp_path: Path) -> None:
    """3 -> 2 -> 3 workers under ps: the replacement takes the clock from rank 0 and the
    parameters from the servers; weights and ledger as an uninterrupted run."""
    options = {"delay_s": 0.05, "marker": str(tmp_path / "killed")}
    jobs = [ps_job(tmp_path / name, at_call=call) for name, call in (("whole", 0), ("j", 5))]
    for job in jobs:
        job["trainer"]["max_epochs"] = 2
        job["model"]["options"].update(options)
    reference, _ = train(jobs[0], set())
    run, members = train(jobs[1], {2}, replace=True)
    assert sorted(members) == [0, 1, 3]
    assert_went_3_2_3(run)
    assert_close_weights(run, reference)


@pytest.mark.parametrize(
    ("strategy", "match"),
    [({"mode": "async"}, "strategy.mode=sync"), ({"mode": "ssp"}, "strategy.mode=sync"),
     ({"data_assignment": "dynamic", "mode": "async"}, "strategy.mode=sync")],
)  # fmt: skip
def test_ps_live_recovery_needs_sync(tmp_path: Path, strategy: dict, match: str) -> None:
    job = ps_job(tmp_path, at_call=0, **strategy)
    job["model"] = {"name": "mlp", "flavor": "debug"}
    with pytest.raises(JobFileError, match=match):
        preflight(validate_job(job))


# --- the shard's side, in process ------------------------------------------------------------


def sync_shard(num_pushers: int, timeout_s: float = 600.0) -> ShardServer:
    server = ShardServer(0)
    setup = ServerSetup(
        mode="sync",
        staleness=0,
        num_pushers=num_pushers,
        world_size=num_pushers,
        build_optimizer=lambda params: torch.optim.SGD(params, lr=1.0),
        build_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
        timeout_s=timeout_s,
    )
    server.initialize(setup, [0], [np.zeros(2, dtype=np.float32)])
    return server


def push(server: ShardServer, pusher: int, step: int, value: float) -> None:
    server.push(pusher, step, [0], np.full(2, value, dtype=np.float32), [True])


def test_resize_drops_the_pending_step_and_ignores_pushes_from_before() -> None:
    server = sync_shard(3)
    push(server, 0, 0, 3.0)  # the lost pusher 2 never pushes step 0
    push(server, 1, 0, 3.0)
    tags = [pusher_tag(1, r) for r in range(2)]
    assert server.resize(tags, 2) == 0
    push(server, 0, 0, 100.0)  # a push from before the resize arrives late: ignored
    push(server, tags[0], 0, 1.0)
    push(server, tags[1], 0, 3.0)
    reply = server.pull(tags[0], 1)
    assert reply.version == 1
    np.testing.assert_allclose(reply.flat, [-2.0, -2.0])  # -(1 + 3) / 2
    with pytest.raises(ServerResetError, match="not in the current group"):
        server.pull(0, 1)


def test_resize_after_a_step_some_shard_applied_keeps_it() -> None:
    server = sync_shard(2)
    push(server, 0, 0, 2.0)
    push(server, 1, 0, 2.0)  # applied: version 1
    tags = [pusher_tag(1, 0)]
    assert server.resize(tags, 1) == 1
    push(server, tags[0], 0, 50.0)  # the survivors redo step 0: this shard had it already
    reply = server.pull(tags[0], 1)
    np.testing.assert_allclose(reply.flat, [-2.0, -2.0])


def test_ps_losing_rank_0_goes_on_under_the_lowest_survivor(tmp_path: Path) -> None:
    reference, _ = train(ps_job(tmp_path / "whole", at_call=0), set())
    job = ps_job(tmp_path / "killed", at_call=5)
    job["model"]["options"]["kill_rank"] = 0
    run, survivors = train(job, {0})
    assert sorted(survivors) == [1, 2]
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and report.epochs[0].steps == 12, report.as_dict()
    assert_close_weights(run, reference)


def test_a_pull_waiting_for_a_lost_pusher_is_a_peer_loss() -> None:
    """Under live recovery the servers wait `collective_timeout_s` (`live.server_wait_s`): a
    worker lost after its vote but before its pushes arrived shows as this timeout, which
    live recovery treats as a lost peer."""
    server = sync_shard(2, timeout_s=0.2)
    push(server, 0, 0, 1.0)
    with pytest.raises(TimeoutError) as info:
        server.pull(0, 1)
    assert is_peer_loss(info.value)
