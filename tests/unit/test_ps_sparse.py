"""Row tables under `ps` in one process: parity with `single`, resume with row state, the
server's sparse push/pull arithmetic, and consolidation of row parts."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roundhouse.config import OptimizerConfig, SchedulerConfig
from roundhouse.parallel.ps import ServerSetup, ShardServer, consolidate_states
from roundhouse.parallel.ps.rows import coalesced_rows
from roundhouse.trainer.optim import build_optimizer, build_scheduler
from tests.helpers.runs import final_weights
from tests.unit.test_ps_local import assert_close, final_weights_at, train

STEPS = 8


def make_job(storage: Path, run_id: str, strategy: dict[str, Any], optimizer: str) -> dict:
    return {
        "name": "pss",
        "model": {"name": "fasttext", "flavor": "debug"},
        "data": {"source": "builtin:pydoc-cls", "batch_size": 16, "options": {"seq_len": 64}},
        "trainer": {
            "max_steps": STEPS,
            "log_every_steps": 2,
            "device": "cpu",
            "optimizer": {"name": optimizer, "lr": 0.5, "momentum": 0.0},
            "scheduler": {"name": "cosine", "warmup_steps": 2},
            "checkpoint": {"every_epoch": False, "every_steps": 4, "keep_last": 5},
        },
        "strategy": strategy,
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": run_id},
    }


@pytest.mark.parametrize(
    ("optimizer", "accum"), [("sgd", 1), ("adagrad", 1), ("lazy_adam", 1), ("sgd", 2)]
)
def test_sparse_ps_equals_single_device(tmp_path: Path, optimizer: str, accum: int) -> None:
    ps_job = make_job(tmp_path, "ps", {"kind": "ps", "num_servers": 3}, optimizer)
    single_job = make_job(tmp_path, "single", {"kind": "single"}, optimizer)
    for job in (ps_job, single_job):
        job["trainer"]["grad_accum_steps"] = accum
    ps, single = train(ps_job), train(single_job)
    ours, reference = final_weights(ps), final_weights(single)
    assert_close(ours, reference)
    first = final_weights_at(ps, 4)
    assert float((ours["embed.weight"] - first["embed.weight"]).abs().max()) > 1e-3


def test_resume_with_row_state_at_another_number_of_servers(tmp_path: Path) -> None:
    whole = train(make_job(tmp_path, "whole", {"kind": "ps", "num_servers": 2}, "adagrad"))
    shutil.copytree(whole, tmp_path / "pss" / "resumed")
    shutil.rmtree(tmp_path / "pss" / "resumed" / "checkpoints" / f"step_{STEPS}")
    job = make_job(tmp_path, "resumed", {"kind": "ps", "num_servers": 3}, "adagrad")
    resumed = train(job, resume_step=4)
    assert_close(final_weights(resumed), final_weights(whole))
    state = torch.load(whole / "checkpoints" / f"step_{STEPS}" / "state.pt", weights_only=True)
    ps = state["strategy"]["ps"]
    table = max(ps["optimizer"]["state"], key=int)  # the row table comes last
    accumulated = ps["optimizer"]["state"][table]["sum"]
    assert accumulated.shape == (4097, 8)  # whole, interleaved back from the shards
    assert 0 < int((accumulated.abs().sum(1) > 0).sum()) < 4096  # only touched rows


def table_setup(num_shards: int, optimizer: str = "sgd") -> ServerSetup:
    config = OptimizerConfig(name=optimizer, lr=0.1, momentum=0.0)
    return ServerSetup(
        mode="sync",
        staleness=0,
        num_pushers=2,
        world_size=2,
        build_optimizer=functools.partial(build_optimizer, config=config),
        build_scheduler=functools.partial(
            build_scheduler, config=SchedulerConfig(), steps_per_epoch=10, total_steps=10
        ),
        row_tables={0: 10},
        num_shards=num_shards,
    )


def test_shards_update_exactly_the_pushed_rows() -> None:
    table = torch.arange(30, dtype=torch.float32).view(10, 3)
    shards = [ShardServer(s) for s in range(2)]
    for shard in shards:
        shard.initialize(table_setup(2), [0], [table.numpy()], None, 0)
    # Pusher 0 touched rows 2 and 3, pusher 1 rows 3 and 5; each shard gets its own rows.
    pushes = {0: ([2, 3], [[1.0] * 3, [2.0] * 3]), 1: ([3, 5], [[4.0] * 3, [6.0] * 3])}
    for pusher, (rows, values) in pushes.items():
        for s, shard in enumerate(shards):
            mine = [i for i, r in enumerate(rows) if r % 2 == s]
            shard.push_rows(pusher, 0, 0, np.array(rows)[mine], np.array(values, np.float32)[mine])
    got = np.concatenate([shards[r % 2].pull_rows(0, 1, 0, np.array([r])) for r in range(10)])
    expected = table.clone()
    expected[2] -= 0.1 * 1.0 / 2
    expected[3] -= 0.1 * (2.0 + 4.0) / 2
    expected[5] -= 0.1 * 6.0 / 2
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)
    merged = consolidate_states([s.state_dict() for s in shards])
    torch.testing.assert_close(merged["params"][0], expected)


def test_a_row_pull_waits_for_every_pusher_in_sync_mode() -> None:
    shard = ShardServer(0)
    shard.initialize(table_setup(1), [0], [np.zeros((10, 3), np.float32)], None, 0)
    shard.push_rows(0, 0, 0, np.array([1]), np.ones((1, 3), np.float32))
    with pytest.raises(TimeoutError):
        shard.setup.timeout_s = 0.2
        shard.pull_rows(0, 1, 0, np.array([1]))
    shard.push_rows(1, 0, 0, np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
    np.testing.assert_allclose(shard.pull_rows(0, 1, 0, np.array([1])), [[-0.05] * 3])


def test_coalesced_rows_sums_repeated_lookups() -> None:
    grad = torch.sparse_coo_tensor([[4, 1, 4]], torch.ones(3, 2), (6, 2))
    rows, values = coalesced_rows(grad, torch.Size([2]))
    assert rows.tolist() == [1, 4] and values.tolist() == [[1.0, 1.0], [2.0, 2.0]]
    rows, values = coalesced_rows(None, torch.Size([2]))
    assert rows.numel() == 0 and values.shape == (0, 2)


def test_the_planner_prices_ps_by_the_rows_touched_and_ring_by_the_table() -> None:
    from roundhouse.parallel.costs import JobShape
    from roundhouse.planner.candidates import candidate
    from roundhouse.planner.costs import comm_time
    from tests.unit.test_planner import profile, target

    shape = JobShape(global_batch=64, grad_accum_steps=1, optimizer_moments=1)
    ring = candidate("ring", 2, {"kind": "ring"}, shape)
    ps = candidate("ps", 2, {"kind": "ps"}, shape)
    dense, t = profile(33_000_000), target()
    sparse = dataclasses.replace(dense, row_params=32_999_000, row_elements_per_sample=511 * 18)

    def seconds(c: Any, p: Any) -> float:
        return sum(comm_time(c, p, t, shape))

    assert seconds(ring, sparse) == pytest.approx(seconds(ring, dense))  # the whole table
    assert seconds(ps, dense) > seconds(ring, dense)  # dense: ring wins
    assert seconds(ps, sparse) < seconds(ring, sparse) / 20  # sparse: ps wins by far
    touched = (1000 + 32 * 511 * 18) * 4  # the head, and the rows of a 32-sample micro-batch
    assert seconds(ps, sparse) == pytest.approx(2 * 2 * touched / 1e9)


def test_the_trace_counts_row_lookups() -> None:
    from roundhouse import models
    from roundhouse.calibration.trace import profile_model
    from roundhouse.config import LossConfig
    from roundhouse.trainer.task import build_task

    with torch.device("meta"):
        model = models.build_model("fasttext", models.BuildConfig(input_shape=(64,), num_classes=4))
    batch = {
        "input": torch.zeros(8, 64, dtype=torch.long, device="meta"),
        "target": torch.zeros(8, dtype=torch.long, device="meta"),
    }
    p = profile_model(model, build_task("classification", LossConfig()), batch)
    assert p.row_params == 4097 * 8
    assert p.row_elements_per_sample == (64 + 63) * (8 + 2)


def test_lazy_adam_matches_sparse_adam_on_rows_and_adam_on_dense() -> None:
    from roundhouse.trainer.lazy_adam import LazyAdam

    torch.manual_seed(0)
    table = torch.randn(10, 3)
    dense = torch.randn(4)
    ours = [table.clone().requires_grad_(), dense.clone().requires_grad_()]
    ref_rows, ref_dense = table.clone().requires_grad_(), dense.clone().requires_grad_()
    lazy = LazyAdam(ours, lr=0.1)
    sparse_adam = torch.optim.SparseAdam([ref_rows], lr=0.1)
    adam = torch.optim.Adam([ref_dense], lr=0.1, foreach=False)
    for step in range(3):
        rows = torch.tensor([[1, 4, 1]]) if step != 1 else torch.tensor([[7]])
        values = torch.randn(rows.shape[1], 3)
        grad = torch.sparse_coo_tensor(rows, values, (10, 3))
        dense_grad = torch.randn(4)
        ours[0].grad, ref_rows.grad = grad.clone(), grad.clone()
        ours[1].grad, ref_dense.grad = dense_grad.clone(), dense_grad.clone()
        lazy.step()
        sparse_adam.step()
        adam.step()
    torch.testing.assert_close(ours[0].detach(), ref_rows.detach())
    torch.testing.assert_close(ours[1].detach(), ref_dense.detach())
    untouched = [0, 2, 3, 5, 6, 8, 9]
    assert torch.equal(ours[0].detach()[untouched], table[untouched])


def test_a_shard_subset_carries_row_tables_over_its_own_shards() -> None:
    """One optimizer's share of the servers (a task stepping several) holds its row tables too:
    the rows are cut over the subset's shards, and the other shards never see them."""
    from roundhouse.parallel.ps.local import LocalParameterStore
    from roundhouse.parallel.ps.subset import ShardSubset

    store = LocalParameterStore(num_servers=4)
    subset = ShardSubset(store, index=1, count=2)  # shards 1 and 3
    table = np.arange(30, dtype=np.float32).reshape(10, 3)
    for s in range(subset.num_servers):
        subset.initialize(s, table_setup(2), [0], [table], None, 0)
    for pusher in (0, 1):
        for s in range(subset.num_servers):
            rows = np.array([r for r in (2, 3) if r % 2 == s])
            subset.push_rows(s, pusher, 0, 0, rows, np.ones((len(rows), 3), np.float32), 1)
    got = subset.pull_rows([0, 1], 0, 1, 0, [np.array([2]), np.array([3])])
    np.testing.assert_allclose(np.concatenate(got), table[[2, 3]] - 0.1, atol=1e-6)
    assert store.servers[0].setup is None and store.servers[2].setup is None
    expected = table.copy()
    expected[[2, 3]] -= 0.1
    merged = consolidate_states(subset.state_dicts([0, 1]))
    np.testing.assert_allclose(merged["params"][0].numpy(), expected, atol=1e-6)


def test_step_calibration_skips_engines_that_refuse_a_sparse_model(tmp_path: Path) -> None:
    """`plan` on a sparse-gradient model: DeepSpeed refuses it, so its engines are not
    calibrated (they failed inside DeepSpeed on the sparse gradient, and `plan` crashed)."""
    from roundhouse.calibration.loop import calibration_job, engine_runs
    from roundhouse.config.loading import load_job

    job = load_job("configs/fasttext_ps.yaml")
    assert not engine_runs(calibration_job(job, str(tmp_path), 8, {"kind": "deepspeed"}))
    assert engine_runs(calibration_job(job, str(tmp_path), 8, {"kind": "single"}))


def test_plan_recommends_ps_for_the_sparse_model_at_its_worker_count(capsys) -> None:
    """The acceptance line: `plan configs/fasttext_ps.yaml` recommends ps. The job asks for 2
    workers; ring must all-reduce the whole 2^21-row table, ps moves the touched rows."""
    from roundhouse.launch.cli import main

    assert main(["plan", "configs/fasttext_ps.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["recommended"]["label"] == "ps" and plan["recommended"]["workers"] == 2
    ring = next(r for r in plan["rows"] if r["label"] == "ring" and r["workers"] == 2)
    assert ring["samples_per_s"] * 10 < plan["recommended"]["samples_per_s"]
    assert not any(r["label"].startswith("zero") for r in plan["rows"])  # DeepSpeed refuses it
