"""Freezing and parameter groups under ring, ps and DeepSpeed equal `single`; ZeRO-3 -> --local.

One job: an MLP whose first layer is frozen (`trainer.freeze`), whose head has half the lr and
no weight decay (`trainer.optimizer.param_groups`), Adam with weight decay and a warmup+cosine
schedule. Every strategy on 2 gloo ranks must end with single's weights (1e-5), and the frozen
layer must still hold its initial values bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.distributed import test_deepspeed_zero as zero
from tests.distributed import test_ps_training as ps
from tests.distributed import test_ring_training as ring
from tests.helpers.runs import final_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FINETUNE = {
    "model__options": {"hidden_sizes": [32, 32]},
    "data__batch_size": 32,
    "trainer__freeze": ["fc1.*"],
    "trainer__optimizer": {
        "name": "adam",
        "lr": 0.01,
        "weight_decay": 0.01,
        "param_groups": [{"match": "head.*", "lr_scale": 0.5, "weight_decay": 0.0}],
    },
    "trainer__scheduler": {"name": "cosine", "warmup_steps": 2},
}


def job_for(tmp_path: Path, run_id: str, strategy: dict[str, Any]) -> dict:
    job = ring.make_job(tmp_path, run_id, **FINETUNE)
    job["name"] = "finetune"
    job["strategy"] = strategy
    return job


def train_single(job: dict) -> Path:
    prepared = prepare_run(validate_job(job))
    run_worker(prepared.job, build_local_context("cpu"))
    return Path(prepared.run_dir.url)


def test_freeze_and_param_groups_equal_single_under_every_strategy(tmp_path: Path) -> None:
    reference = final_weights(train_single(job_for(tmp_path, "single", {"kind": "single"})))
    initial = ring.initial_weights(job_for(tmp_path, "init", {"kind": "single"}))
    for name in ("fc1.weight", "fc1.bias"):
        assert torch.equal(reference[name], initial[name]), f"frozen {name} moved"
    assert (reference["head.weight"] - initial["head.weight"]).abs().max() > 1e-2
    runs = {
        "ring": ring.train(job_for(tmp_path, "ring", {"kind": "ring", "bucket_mb": 0.002}), 2),
        "ps": ps.train(job_for(tmp_path, "ps", {"kind": "ps", "num_servers": 2}), 2),
        "zero2": zero.train(job_for(tmp_path, "z2", {"kind": "deepspeed", "zero_stage": 2}), 2),
        "zero3": zero.train(job_for(tmp_path, "z3", {"kind": "deepspeed", "zero_stage": 3}), 2),
    }
    for case, run in runs.items():
        weights = final_weights(run)
        ring.assert_close_weights(weights, reference)
        assert torch.equal(weights["fc1.weight"], initial["fc1.weight"]), case


def test_zero3_checkpoint_initialises_a_local_run(tmp_path: Path) -> None:
    trained = zero.train(zero.ds_job(tmp_path, "z3", 3, trainer__max_steps=3), 2)
    source = final_weights(trained)
    job = zero.ds_job(tmp_path, "local", 0, trainer__max_steps=0)
    job["strategy"] = {"kind": "single"}
    job["model"]["init_from"] = str(trained)
    converted = final_weights(train_single(job))
    assert converted.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(converted[name], tensor), name
