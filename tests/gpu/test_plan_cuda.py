"""The plan's peak memory for a single CUDA worker against `torch.cuda.max_memory_allocated`.

Only the memory model is exercised (no step-time calibration runs): gpt:small, 16 sequences of
256 tokens, two bf16-autocast AdamW steps, a few seconds on one GPU.
"""

from __future__ import annotations

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.planner.candidates import Candidate
from roundhouse.planner.costs import JobShape, estimate_memory
from roundhouse.planner.plan import job_shape
from roundhouse.planner.target import JobModel, build_target, job_profile
from roundhouse.trainer.optim import build_optimizer

pytestmark = pytest.mark.gpu


def test_single_worker_peak_within_20_percent_of_cuda_max_memory_allocated() -> None:
    job = validate_job(
        {
            "name": "plan_gpu",
            "model": {"name": "gpt", "flavor": "small"},
            "data": {
                "source": "builtin:pytext",
                "batch_size": 16,
                "options": {"seq_len": 256, "max_bytes": 200000},
            },
            "trainer": {"max_steps": 2, "device": "cuda", "optimizer": {"name": "adamw"}},
            "strategy": {"kind": "single"},
            "cluster": {"num_workers": 1},
        }
    )
    jm = JobModel(job)
    profile = job_profile(jm)
    target = build_target(jm, profile, "cuda", 1e9, 1)
    shape: JobShape = job_shape(job)
    single = Candidate("single", 1, {"kind": "single"})
    predicted = estimate_memory(single, profile, target, shape, micro=16)

    torch.manual_seed(0)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = jm.build().cuda()
    optimizer = build_optimizer(model.parameters(), config=job.trainer.optimizer)
    batch = jm.batch(16, "cuda")
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = jm.task.loss(jm.task.forward(model, batch), batch)
        loss.backward()
        optimizer.step()
    measured = torch.cuda.max_memory_allocated() - base
    assert predicted.total == pytest.approx(measured, rel=0.2)
