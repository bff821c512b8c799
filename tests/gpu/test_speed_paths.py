"""CUDA paths of the speed features: bf16 autocast, the ring's gradient buckets on CUDA tensors
(hooks on the autograd thread, packing on the comm thread), DeepSpeed on nccl, torch.compile.
Skipped where CUDA is absent (`make gpu-check` runs them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from roundhouse.config.loading import validate_job
from roundhouse.parallel.deepspeed.strategy import init_deepspeed_dist
from roundhouse.parallel.ring import OverlappedAllReduce
from roundhouse.trainer import WorkerContext, build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.runs import final_weights, read_metrics

pytestmark = pytest.mark.gpu


def gpt_job(storage: Path, run_id: str, **trainer: Any) -> dict[str, Any]:
    return {
        "name": "gpu",
        "model": {"name": "gpt", "flavor": "debug"},
        "data": {
            "source": "builtin:pytext",
            "options": {"seq_len": 64, "max_bytes": 300_000},
            "batch_size": 16,
        },
        "trainer": {
            "max_steps": 12,
            "log_every_steps": 4,
            "device": "cuda",
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            "optimizer": {"name": "adamw", "lr": 3e-3},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": run_id},
    }


def train(job: dict[str, Any]) -> Path:
    prepared = prepare_run(validate_job(job))
    run_worker(prepared.job, build_local_context("cuda"))
    return Path(prepared.run_dir.url)


def test_bf16_autocast_on_cuda_trains_close_to_fp32(tmp_path: Path) -> None:
    fp32 = final_weights(train(gpt_job(tmp_path, "fp32", precision="fp32")))
    run = train(gpt_job(tmp_path, "bf16", precision="bf16"))
    bf16 = final_weights(run)
    gaps = [float((bf16[k].float() - fp32[k].float()).abs().max()) for k in fp32]
    assert 1e-6 < max(gaps) < 5e-2, gaps  # autocast ran, and stayed within bf16 rounding
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert losses[-1] < losses[0]


def test_ring_buckets_read_cuda_gradients_in_stream_order() -> None:
    """The comm thread packs each bucket once its hooks fired; on CUDA the gradient kernels
    may still be queued then. Doubling in the "reduce" must give exactly 2x every gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).cuda()
    x = torch.randn(512, 1024, device="cuda")
    model(x).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    comm = OverlappedAllReduce(list(model.parameters()), lambda b: b.mul_(2), bucket_mb=4)
    try:
        comm.begin()
        model(x).square().mean().backward()
        comm.flush()
        comm.wait()
    finally:
        comm.close()
    assert len(comm.buckets) > 2  # several buckets, launched while backward ran
    for p, grad in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p.grad, 2 * grad)


def test_deepspeed_zero2_bf16_on_nccl_in_one_process(tmp_path: Path) -> None:
    job = gpt_job(tmp_path, "ds", precision="bf16")
    job["strategy"] = {"kind": "deepspeed", "zero_stage": 2}
    run = train(job)
    losses = [r["train/loss"] for r in read_metrics(run) if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(w).all() for w in final_weights(run).values())
    # The one-rank group the strategy made for that run (and destroyed) was nccl's.
    assert init_deepspeed_dist(WorkerContext(device=torch.device("cuda")))
    try:
        assert dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()


SGD = {"name": "sgd", "lr": 0.3}  # Adam's normalized steps turn rounding noise into lr-sized gaps


def test_compile_on_cuda_matches_eager(tmp_path: Path) -> None:
    """Inductor's fused CUDA kernels round differently: 2.6e-3 apart after 12 steps (H200)."""
    runs = {}
    for compile_ in (False, True):
        job = gpt_job(tmp_path, f"c{compile_}", precision="fp32", optimizer=SGD, compile=compile_)
        runs[compile_] = final_weights(train(job))
    assert runs[True].keys() == runs[False].keys()
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=0, atol=1e-2)
