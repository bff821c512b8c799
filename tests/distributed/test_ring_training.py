"""DESIGN rule 5 for `ring`: N gloo processes end with the parameters of one process on the
whole batch. Every run goes through the real `run_worker(job, ctx)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.data import build_splits
from roundhouse.trainer import WorkerContext, build_local_context, run_worker
from roundhouse.weights.model_build import build_model_for, seed_everything
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights

TIMEOUT_S = 120
STEPS = 8


def make_job(storage: Path, run_id: str, **overrides: Any) -> dict:
    job = {
        "name": "ring",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 30},
        "trainer": {
            "max_steps": STEPS,
            "log_every_steps": 2,
            "device": "cpu",
            "optimizer": {"name": "sgd", "lr": 0.1},
            "checkpoint": {"every_epoch": False, "keep_last": 5},
        },
        "strategy": {"kind": "ring", "bucket_mb": 0.002},  # ~500 floats: several buckets
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": run_id},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = job
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return job


def node_context(rank: int, world_size: int, ranks_per_node: int) -> WorkerContext:
    return WorkerContext(
        rank=rank,
        world_size=world_size,
        local_rank=rank % ranks_per_node,
        local_world_size=ranks_per_node,
        node_rank=rank // ranks_per_node,
        num_nodes=world_size // ranks_per_node,
        device=torch.device("cpu"),
    )


def train_rank(rank: int, world_size: int, job: dict, ranks_per_node: int, resume: bool) -> dict:
    ctx = node_context(rank, world_size, ranks_per_node)
    return run_worker(validate_job(job), ctx, resume=resume)


def train(job: dict, world_size: int, ranks_per_node: int = 1, resume: bool = False) -> Path:
    """Run `job` on `world_size` processes (or in this one, for 1 with kind=single)."""
    prepared = prepare_run(validate_job(job))  # once per job, as the launcher does
    if world_size == 1 and job["strategy"]["kind"] == "single":
        run_worker(prepared.job, build_local_context("cpu"), resume=resume)
    else:
        run_distributed(train_rank, world_size, TIMEOUT_S, job, ranks_per_node or 1, resume)
    return Path(prepared.run_dir.url)


def single_reference(tmp_path: Path, **overrides: Any) -> dict[str, torch.Tensor]:
    job = make_job(tmp_path, "single", **overrides)
    job["strategy"] = {"kind": "single"}
    return final_weights(train(job, 1))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            a[key], b[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )


CASES = {
    "2 ranks": ({}, 2, 1),
    "3 ranks, uneven split": ({}, 3, 1),
    "native algorithm": ({"strategy__algorithm": "native"}, 2, 1),
    "hierarchical 2x2": ({"strategy__hierarchical": True}, 4, 2),
    "grad accumulation": ({"trainer__grad_accum_steps": 2}, 2, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ring_training_equals_single_device(tmp_path: Path, case: str) -> None:
    overrides, world_size, per_node = CASES[case]
    ours = final_weights(train(make_job(tmp_path, "ring", **overrides), world_size, per_node))
    reference = single_reference(tmp_path, **overrides)
    initial = initial_weights(make_job(tmp_path, "init"))
    moved = max(float((ours[k] - initial[k]).abs().max()) for k in ours)
    assert moved > 1e-2, "training barely moved the weights: the 1e-5 parity would say little"
    assert_close_weights(ours, reference)


def initial_weights(job: dict) -> dict[str, torch.Tensor]:
    """The weights every run starts from: `run_worker` seeds, then builds the model."""
    spec = validate_job(job)
    seed_everything(spec.trainer.seed, spec.trainer.deterministic, torch.device("cpu"))
    splits = build_splits(spec.data, seed=spec.trainer.seed)
    model = build_model_for(spec, splits.info.input_shape, splits.info.num_classes)
    return model.state_dict()
