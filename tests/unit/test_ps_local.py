"""The `ps` strategy in one process (`--local`): the in-process store, parity with `single`,
re-sharding on resume, and the server's sync/async/ssp rules called directly.
"""

from __future__ import annotations

import functools
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roundhouse.config import OptimizerConfig, SchedulerConfig
from roundhouse.config.loading import validate_job
from roundhouse.parallel.ps import ServerSetup, ShardServer, build_layout, consolidate_states
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.optim import build_optimizer, build_scheduler
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.runs import final_weights, read_metrics

STEPS = 12


def make_job(storage: Path, run_id: str, strategy: dict[str, Any], **trainer: Any) -> dict:
    return {
        "name": "psl",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 30},
        "trainer": {
            "max_steps": STEPS,
            "log_every_steps": 3,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "scheduler": {"name": "cosine", "warmup_steps": 2},
            "checkpoint": {"every_epoch": False, "every_steps": 6, "keep_last": 5},
            **trainer,
        },
        "strategy": strategy,
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": run_id},
    }


def train(job: dict, resume_step: int | None = None) -> Path:
    spec = validate_job(job)
    prepared = prepare_run(spec)
    run_worker(prepared.job, build_local_context("cpu"), resume_step, resume_step is not None)
    return Path(prepared.run_dir.url)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


@pytest.mark.parametrize("accum", [1, 2])
def test_local_ps_equals_single_device(tmp_path: Path, accum: int) -> None:
    ps = train(make_job(tmp_path, "ps", {"kind": "ps", "num_servers": 2}, grad_accum_steps=accum))
    single = train(make_job(tmp_path, "single", {"kind": "single"}, grad_accum_steps=accum))
    ours, reference = final_weights(ps), final_weights(single)
    assert_close(ours, reference)
    first = final_weights_at(ps, 6)
    assert max(float((ours[k] - first[k]).abs().max()) for k in ours) > 1e-3  # it trained
    rows = [r for r in read_metrics(ps) if "train/lr" in r]
    reference_rows = [r for r in read_metrics(single) if "train/lr" in r]
    # The servers ran the job's schedule: the same lr and gradient norm at every log step.
    for ours_row, ref_row in zip(rows, reference_rows, strict=True):
        assert ours_row["train/lr"] == pytest.approx(ref_row["train/lr"], rel=1e-6)
        assert ours_row["train/grad_norm"] == pytest.approx(ref_row["train/grad_norm"], rel=1e-4)


def final_weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / f"step_{step}" / "state.pt", weights_only=True)
    return state["strategy"]["model"]


def test_resume_at_another_number_of_servers_continues_exactly(tmp_path: Path) -> None:
    whole = train(make_job(tmp_path, "whole", {"kind": "ps", "num_servers": 1}))
    part = whole.parent / "part"
    shutil.copytree(whole, part)  # the same run, to resume from its step 6
    shutil.rmtree(part / "checkpoints" / "step_12")  # must be written again
    train(make_job(tmp_path, "part", {"kind": "ps", "num_servers": 3}), resume_step=6)
    assert_close(final_weights(part), final_weights(whole))
    state = torch.load(part / "checkpoints" / "step_6" / "state.pt", weights_only=True)
    ps = state["strategy"]["ps"]
    assert ps["clock"] == 6 and ps["scheduler"]["last_epoch"] == 6
    assert set(ps["optimizer"]["state"]) == {0, 1, 2, 3}  # Adam moments of every parameter


def test_grad_clipping_is_refused(tmp_path: Path) -> None:
    from roundhouse.errors import JobFileError
    from roundhouse.trainer.preflight import preflight

    job = make_job(tmp_path, "clip", {"kind": "ps"}, grad_clip_norm=1.0)
    with pytest.raises(JobFileError, match="grad_clip_norm"):
        train(job)
    with pytest.raises(JobFileError, match="grad_clip_norm"):  # by the launcher, before a start
        preflight(validate_job(job))


# --- sharding and the server's rules -------------------------------------------------------


def test_layout_is_balanced_and_complete() -> None:
    numels = [1000, 10, 500, 490, 30, 5]
    layout = build_layout(numels, 2)
    assert sorted(g for shard in layout for g in shard) == list(range(6))
    loads = [sum(numels[g] for g in shard) for shard in layout]
    assert max(loads) - min(loads) <= 30
    assert build_layout(numels, 2) == layout  # deterministic on every worker
    assert [len(s) for s in build_layout([4, 4], 3)].count(0) == 1


def sgd_setup(mode: str, num_pushers: int, staleness: int = 0) -> ServerSetup:
    return ServerSetup(
        mode=mode,
        staleness=staleness,
        num_pushers=num_pushers,
        world_size=num_pushers,
        build_optimizer=functools.partial(
            build_optimizer, config=OptimizerConfig(name="sgd", lr=0.5, momentum=0.0)
        ),
        build_scheduler=functools.partial(
            build_scheduler, config=SchedulerConfig(), steps_per_epoch=10, total_steps=10
        ),
        timeout_s=5.0,
    )


def server(mode: str, num_pushers: int, staleness: int = 0) -> ShardServer:
    shard = ShardServer(0)
    params = [np.zeros(2, dtype=np.float32), np.ones(1, dtype=np.float32)]
    shard.initialize(sgd_setup(mode, num_pushers, staleness), [3, 7], params)
    return shard


def push(shard: ShardServer, pusher: int, step: int, g3: float, g7: float) -> None:
    flat = np.array([g3, g3, g7], dtype=np.float32)
    shard.push(pusher, step, [3, 7], flat, [True, True], 1)


def test_sync_applies_the_average_once_every_pusher_arrived() -> None:
    shard = server("sync", 2)
    shard.push(0, 0, [7], np.array([2.0], dtype=np.float32), [True], 1)  # in two pieces
    shard.push(0, 0, [3], np.array([1.0, 1.0], dtype=np.float32), [True], 1)
    assert shard.pull(0, 0).version == 0
    push(shard, 1, 0, 3.0, 0.0)
    reply = shard.pull(0, 1)
    # lr 0.5 x mean gradient: [-(1+3)/2*0.5]*2 and 1 - (2+0)/2*0.5
    np.testing.assert_allclose(reply.flat, [-1.0, -1.0, 0.5])
    assert reply.version == 1 and reply.grad_sq_norm == pytest.approx(2 * 4.0 + 1.0)


def test_a_push_with_pull_step_replies_with_the_next_steps_parameters() -> None:
    shard = server("sync", 2)
    replies: list = []
    flat = np.array([1.0, 1.0, 2.0], dtype=np.float32)
    worker = threading.Thread(
        target=lambda: replies.append(shard.push(0, 0, [3, 7], flat, [True, True], 1, 1)),
        daemon=True,
    )
    worker.start()
    worker.join(0.3)
    assert worker.is_alive()  # sync: step 1's parameters need pusher 1's gradient too
    assert shard.push(1, 0, [3, 7], flat * 3, [True, True], 1) is None  # no pull_step
    worker.join(5.0)
    np.testing.assert_allclose(replies[0].flat, shard.pull(1, 1).flat)
    np.testing.assert_allclose(replies[0].flat, [-1.0, -1.0, -1.0])  # lr 0.5, mean [2, 2, 4]
    assert replies[0].version == 1


def test_async_applies_each_push_on_arrival() -> None:
    shard = server("async", 2)
    push(shard, 0, 0, 1.0, 2.0)
    np.testing.assert_allclose(shard.pull(1, 0).flat, [-0.5, -0.5, 0.0])
    push(shard, 1, 0, 1.0, 0.0)
    np.testing.assert_allclose(shard.pull(1, 1).flat, [-1.0, -1.0, 0.0])


def test_ssp_blocks_a_worker_too_far_ahead() -> None:
    shard = server("ssp", 2, staleness=1)
    for step in range(2):
        push(shard, 0, step, 0.0, 0.0)
    assert shard.pull(0, 1).ahead == 1  # 1 step ahead of pusher 1: allowed
    done = threading.Event()
    threading.Thread(target=lambda: (shard.pull(0, 2), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # 2 ahead of the slowest: waits
    push(shard, 1, 0, 0.0, 0.0)
    assert done.wait(5.0)


def test_a_pull_sent_before_its_own_push_waits_for_it() -> None:
    """Workers send a step's pull without waiting for its pushes: even async reads its writes."""
    shard = server("async", 2)
    replies: list = []
    thread = threading.Thread(target=lambda: replies.append(shard.pull(0, 1)), daemon=True)
    thread.start()
    thread.join(0.3)
    assert not replies  # pusher 0's gradient of step 0 has not arrived
    push(shard, 0, 0, 1.0, 2.0)
    thread.join(5.0)
    np.testing.assert_allclose(replies[0].flat, [-0.5, -0.5, 0.0])


def test_non_finite_gradients_skip_the_update_but_count_the_step() -> None:
    shard = server("sync", 1)
    push(shard, 0, 0, float("nan"), 1.0)
    reply = shard.pull(0, 1)
    np.testing.assert_allclose(reply.flat, [0.0, 0.0, 1.0])  # unchanged
    assert reply.version == 1 and not np.isfinite(reply.grad_sq_norm)


def test_server_state_consolidates_across_shards() -> None:
    shards = [ShardServer(i) for i in range(2)]
    setup = sgd_setup("sync", 1)
    shards[0].initialize(setup, [0], [np.zeros(2, dtype=np.float32)])
    shards[1].initialize(setup, [1], [np.ones(3, dtype=np.float32)])
    state = consolidate_states([s.state_dict() for s in shards])
    assert set(state["params"]) == {0, 1} and state["scheduler"]["last_epoch"] == 0
    fresh = ShardServer(5)
    fresh.initialize(setup, [0, 1], [np.zeros(2), np.ones(3)], state, step=4)
    assert fresh.pull(0, 4).version == 4  # clocks restart at the resumed step
