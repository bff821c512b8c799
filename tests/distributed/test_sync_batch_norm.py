"""`model.options.norm: sync_batch`: 2 gloo ranks normalize with the global batch's statistics,
so outputs, running statistics, gradients and trained weights equal one process on the whole
batch (DESIGN rule 5), under ring and ps; `batch` on the same ranks does not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roundhouse import models
from roundhouse.parallel.sync_norm import GlobalBatchNorm, apply_sync_batch_norm
from roundhouse.trainer import build_local_context
from tests.distributed.test_ps_training import train as train_ps
from tests.distributed.test_ring_training import make_job, node_context, train
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights

TIMEOUT_S = 180
BATCH = 12


def resnet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = models.BuildConfig(flavor="debug", input_shape=(1, 8, 8), num_classes=10)
    return models.build_model("resnet", config).train()


def whole_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 1, 8, 8, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)


def step_outputs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world: int) -> dict:
    """Outputs, running statistics and gradients of one step on `x` (the loss is the rank's
    mean over its samples divided by the world size: the ranks' average gradient)."""
    out = model(x)
    (torch.nn.functional.cross_entropy(out, y) / world).backward()
    return {
        "out": out.detach(),
        "stats": {k: v.clone() for k, v in model.state_dict().items() if "running" in k},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


def sync_rank(rank: int, world: int, norm: str) -> dict:
    model = resnet()
    replaced = apply_sync_batch_norm(model, norm, node_context(rank, world, world))
    x, y = whole_batch()
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    result = step_outputs(model, x[share], y[share], world)
    for grad in result["grads"].values():  # what every strategy's exchange does
        torch.distributed.all_reduce(grad)
    return {**result, "replaced": replaced}


def reference() -> dict:
    x, y = whole_batch()
    return step_outputs(resnet(), x, y, 1)


@pytest.mark.timeout(TIMEOUT_S * 2)
def test_outputs_statistics_and_gradients_equal_one_process_on_the_whole_batch() -> None:
    expected = reference()
    ranks = run_distributed(sync_rank, 2, TIMEOUT_S, "sync_batch")
    assert ranks[0]["replaced"] == sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in resnet().modules()
    )
    torch.testing.assert_close(
        torch.cat([r["out"] for r in ranks]), expected["out"], atol=1e-5, rtol=0
    )
    for rank in ranks:
        for key, value in expected["stats"].items():
            torch.testing.assert_close(rank["stats"][key], value, atol=1e-5, rtol=0)
        for key, value in expected["grads"].items():
            torch.testing.assert_close(rank["grads"][key], value, atol=1e-5, rtol=0)
    per_rank = run_distributed(sync_rank, 2, TIMEOUT_S, "batch")  # per-rank statistics differ
    assert per_rank[0]["replaced"] == 0
    assert not torch.allclose(torch.cat([r["out"] for r in per_rank]), expected["out"], atol=1e-3)


def cnn_job(storage: Path, run_id: str, kind: str, norm: str) -> dict:
    job = make_job(storage, run_id, data__batch_size=16)
    job["model"] = {"name": "resnet", "flavor": "debug", "options": {"norm": norm}}
    job["trainer"]["max_steps"] = 3
    job["strategy"] = {"kind": kind}
    return job


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=1e-5, rtol=0, msg=key)


@pytest.mark.timeout(TIMEOUT_S * 3)
def test_ring_and_ps_with_sync_batch_train_the_weights_of_one_process(tmp_path: Path) -> None:
    single = cnn_job(tmp_path / "single", "single", "single", "sync_batch")
    expected = final_weights(train(single, 1))
    ring = final_weights(train(cnn_job(tmp_path / "ring", "ring", "ring", "sync_batch"), 2))
    assert_same(ring, expected)
    ps_job = cnn_job(tmp_path / "ps", "ps", "ps", "sync_batch")
    ps_job["strategy"] = {"kind": "ps", "num_servers": 1, "node_aggregation": False}
    assert_same(final_weights(train_ps(ps_job, 2)), expected)


def test_sync_batch_alone_warns_and_keeps_batch_norm(caplog: pytest.LogCaptureFixture) -> None:
    model = resnet()
    with caplog.at_level("WARNING"):
        assert apply_sync_batch_norm(model, "sync_batch", build_local_context("cpu")) == 0
    assert "same as norm=batch" in caplog.text
    assert not any(isinstance(m, GlobalBatchNorm) for m in model.modules())


@pytest.mark.timeout(600)
def test_deepspeed_zero1_with_sync_batch_trains_the_weights_of_one_process(tmp_path: Path) -> None:
    from tests.distributed.test_deepspeed_zero import ds_job
    from tests.distributed.test_deepspeed_zero import train as train_ds

    def job(run_id: str, kind: str) -> dict:
        spec = ds_job(tmp_path / run_id, run_id, 1)
        spec["model"] = {"name": "resnet", "flavor": "debug", "options": {"norm": "sync_batch"}}
        spec["trainer"]["max_steps"] = 3
        spec["strategy"] = (
            {"kind": kind, "zero_stage": 1} if kind == "deepspeed" else {"kind": kind}
        )
        return spec

    expected = final_weights(train_ds(job("single", "single"), 1))
    assert_same(final_weights(train_ds(job("ds", "deepspeed"), 2)), expected)
