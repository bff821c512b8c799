"""Sparse-gradient models across processes: `ps` row tables and `ring` (dense all-reduce or
all-gathered rows) end where `single` ends on the whole batch (DESIGN rule 5), on fasttext."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.parallel.ps.manager import Address, connect_store, shard_manager
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_ring_training import assert_close_weights, node_context
from tests.distributed.test_ring_training import train as train_ring
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights, read_metrics

TIMEOUT_S = 180
STEPS = 8
pytestmark = pytest.mark.slow


def make_job(storage: Path, run_id: str, strategy: dict[str, Any], **trainer: Any) -> dict:
    return {
        "name": "sparse",
        "model": {"name": "fasttext", "flavor": "debug"},
        "data": {"source": "builtin:pydoc-cls", "batch_size": 16, "options": {"seq_len": 64}},
        "trainer": {
            "max_steps": STEPS,
            "log_every_steps": 2,
            "device": "cpu",
            "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.0},
            "checkpoint": {"every_epoch": False, "keep_last": 2},
            **trainer,
        },
        "strategy": strategy,
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": run_id},
    }


def ps_rank(rank: int, world_size: int, job: dict, address: Address, servers: int) -> dict:
    ctx = node_context(rank, world_size, 1)
    ctx = type(ctx)(**{**ctx.__dict__, "services": {"ps": connect_store(address, servers)}})
    return run_worker(validate_job(job), ctx)


def train_ps(job: dict, world_size: int) -> tuple[Path, list[dict]]:
    prepared = prepare_run(validate_job(job))
    servers = job["strategy"].get("num_servers", 1)
    with shard_manager() as address:
        results = run_distributed(ps_rank, world_size, TIMEOUT_S, job, address, servers)
    return Path(prepared.run_dir.url), results


def single(tmp_path: Path, **trainer: Any) -> dict[str, torch.Tensor]:
    prepared = prepare_run(
        validate_job(make_job(tmp_path, "single", {"kind": "single"}, **trainer))
    )
    run_worker(prepared.job, build_local_context("cpu"))
    return final_weights(Path(prepared.run_dir.url))


@pytest.mark.timeout(TIMEOUT_S * 2)
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_sparse_ps_on_2_ranks_equals_single(tmp_path: Path, optimizer: str) -> None:
    opt = {"name": optimizer, "lr": 0.5, "momentum": 0.0}
    strategy = {"kind": "ps", "num_servers": 2, "node_aggregation": False}
    run, _ = train_ps(make_job(tmp_path, "ps", strategy, optimizer=opt), 2)
    reference = single(tmp_path, optimizer=opt)
    ours = final_weights(run)
    assert_close_weights(ours, reference)
    assert float(ours["embed.weight"].abs().sum()) != pytest.approx(0.0)


@pytest.mark.timeout(TIMEOUT_S * 2)
@pytest.mark.parametrize("exchange", ["dense", "gather"])
def test_ring_on_2_ranks_equals_single(tmp_path: Path, exchange: str) -> None:
    strategy = {"kind": "ring", "bucket_mb": 0.01, "sparse_gradients": exchange}
    run = train_ring(make_job(tmp_path, f"ring-{exchange}", strategy), 2)
    assert_close_weights(final_weights(run), single(tmp_path))


@pytest.mark.timeout(TIMEOUT_S * 2)
@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_sparse_ps_async_and_ssp_learn(tmp_path: Path, mode: str) -> None:
    strategy = {"kind": "ps", "num_servers": 2, "mode": mode, "staleness": 1}
    job = make_job(
        tmp_path,
        mode,
        strategy,
        max_steps=None,
        max_epochs=2,
        log_every_steps=20,
        optimizer={"name": "adagrad", "lr": 0.5},
    )
    job["data"]["batch_size"] = 64
    run, _ = train_ps(job, 2)
    rows = read_metrics(run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert rows[-1]["test/accuracy"] > 0.2  # 20 classes: chance is about 0.05
