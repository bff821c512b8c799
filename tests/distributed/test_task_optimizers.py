"""A user's task with two optimizers stepped in turn (examples/my_task.py) on 2 gloo ranks under
ring, ps and DeepSpeed ZeRO 0-2 ends with the weights of `single` on the whole batch (DESIGN
rule 5); each strategy exchanges only the stepped optimizer's gradients; resume is exact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.parallel.ps.manager import connect_store, shard_manager
from roundhouse.parallel.ps.remote import SERVICE
from roundhouse.runs.rundir import run_dir_of
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.run import build_trainer
from roundhouse.weights.checkpoint import Checkpointer
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_ring_training import assert_close_weights, make_job, node_context
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights, read_metrics

TIMEOUT_S = 240
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
BODY = ["encoder.1.weight", "encoder.1.bias", "classifier.weight", "classifier.bias"]
DECODER = ["decoder.weight", "decoder.bias"]


def task_job(storage: Path, run_id: str, strategy: dict[str, Any], **overrides: Any) -> dict:
    """examples/my_task.yaml's model and task: adam for the body, sgd for the decoder."""
    settings = {
        "model": {"name": "examples.my_task:AutoencoderClassifier", "options": {"hidden": 16}},
        "task": {
            "name": "examples.my_task:ClassifyAndReconstruct",
            "optimizers": {"decoder": {"optimizer": {"name": "sgd", "lr": 0.5}}},
        },
        "trainer__optimizer": {"name": "adam", "lr": 0.01},
        "trainer__scheduler": {"name": "constant", "warmup_steps": 3},
        "trainer__max_steps": 6,
        "trainer__log_every_steps": 1,
        "data__batch_size": 32,
    }
    job = make_job(storage, run_id, **{**settings, **overrides})
    job["name"] = "tasks"
    job["strategy"] = strategy
    return job


def rank_main(rank: int, world_size: int, job: dict, address: Any, resume: bool) -> None:
    ctx = node_context(rank, world_size, 1)
    if address is not None:
        store = connect_store(address, 4)
        ctx = dataclasses.replace(ctx, services={**ctx.services, SERVICE: store})
    run_worker(validate_job(job), ctx, resume=resume)


def train(job: dict, world_size: int = 2, resume: bool = False) -> Path:
    """`job` through the real `run_worker`: in this process for `single`, else on gloo ranks."""
    prepared = prepare_run(validate_job(job))
    kind = job["strategy"]["kind"]
    if kind == "single":
        run_worker(prepared.job, build_local_context("cpu"), resume=resume)
    elif kind == "ps":
        with shard_manager() as address:
            run_distributed(rank_main, world_size, TIMEOUT_S, job, address, resume)
    else:
        run_distributed(rank_main, world_size, TIMEOUT_S, prepared.job.model_dump(), None, resume)
    return Path(prepared.run_dir.url)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The reference weights; both optimizers moved their own parameters."""
    tmp = tmp_path_factory.mktemp("single")
    run = train(task_job(tmp, "single", {"kind": "single"}))
    rows = [r for r in read_metrics(run) if "train/loss_body" in r]
    assert len(rows) == 6  # each optimizer with its own lr after the shared 3-step warmup:
    assert (rows[-1]["train/lr_body"], rows[-1]["train/lr_decoder"]) == (0.01, 0.5)
    weights = final_weights(run)
    initial = final_weights(train(task_job(tmp, "init", {"kind": "single"}, trainer__max_steps=0)))
    for group in (BODY, DECODER):
        assert max(float((weights[k] - initial[k]).abs().max()) for k in group) > 1e-2
    return weights


STRATEGIES = {
    "ring": {"kind": "ring", "bucket_mb": 0.001},
    "ps": {"kind": "ps", "num_servers": 2, "node_aggregation": False},
    "deepspeed zero0": {"kind": "deepspeed", "zero_stage": 0},
    "deepspeed zero1": {"kind": "deepspeed", "zero_stage": 1},
    "deepspeed zero2": {"kind": "deepspeed", "zero_stage": 2},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_two_optimizers_equal_single(
    tmp_path: Path, name: str, single: dict[str, torch.Tensor]
) -> None:
    ours = final_weights(train(task_job(tmp_path, "dist", STRATEGIES[name])))
    assert_close_weights(ours, single)


def exchanged_parameters(rank: int, world_size: int, job: dict, address: Any) -> dict:
    """Which parameters each optimizer's part exchanges, from the built strategy."""
    ctx = node_context(rank, world_size, 1)
    if address is not None:
        store = connect_store(address, 4)
        ctx = dataclasses.replace(ctx, services={**ctx.services, SERVICE: store})
    spec = validate_job(job)
    checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
    trainer = build_trainer(spec, ctx, checkpointer, None)
    strategy = trainer.strategy
    names = {id(p): n for n, p in strategy.model.named_parameters()}
    try:
        return {
            name: sorted(names[id(p)] for p in part.params) for name, part in strategy.parts.items()
        }
    finally:
        strategy.close()


@pytest.mark.parametrize("name", ["ring", "ps"])
def test_each_part_exchanges_only_its_optimizers_parameters(tmp_path: Path, name: str) -> None:
    job = task_job(tmp_path, "parts", STRATEGIES[name])
    prepare_run(validate_job(job))
    if name == "ps":
        with shard_manager() as address:
            result = run_distributed(exchanged_parameters, 2, TIMEOUT_S, job, address)
    else:
        result = run_distributed(exchanged_parameters, 2, TIMEOUT_S, job, None)
    assert result[0] == {"body": sorted(BODY), "decoder": sorted(DECODER)}


def test_resume_holds_every_optimizer(tmp_path: Path) -> None:
    """Stop at step 3 (a checkpoint), resume to 6: the weights of an uninterrupted run."""
    ring = STRATEGIES["ring"]
    full = final_weights(train(task_job(tmp_path, "full", ring)))
    every = {"every_steps": 3, "every_epoch": False, "keep_last": 5}
    half = task_job(tmp_path, "half", ring, trainer__max_steps=3, trainer__checkpoint=every)
    train(half)
    rest = task_job(tmp_path, "half", ring, trainer__max_steps=6, trainer__checkpoint=every)
    run = train(rest, resume=True)
    state = torch.load(run / "checkpoints" / "step_6" / "state.pt", weights_only=True)
    assert set(state["strategy"]["optimizers"]) == {"body", "decoder"}
    assert "state" in state["strategy"]["optimizers"]["body"]["optimizer"]  # adam moments
    assert_close_weights(final_weights(run), full)


GAN_STRATEGIES = {
    "ring": {"kind": "ring"},
    "ps": {"kind": "ps", "num_servers": 2, "node_aggregation": False},
    "deepspeed zero2": {"kind": "deepspeed", "zero_stage": 2},
}


@pytest.mark.parametrize("name", list(GAN_STRATEGIES))
def test_gan_trains_under_every_strategy(tmp_path: Path, name: str) -> None:
    """configs/gan_digits.yaml's task on dcgan:debug: both players step under each strategy."""
    job = make_job(
        tmp_path,
        "gan",
        model={"name": "dcgan", "flavor": "debug", "options": {"spectral_norm": True}},
        task={"name": "gan"},
        trainer__max_steps=2,
        trainer__log_every_steps=1,
        trainer__optimizer={"name": "adam", "lr": 0.001, "betas": [0.5, 0.999]},
        data__batch_size=16,
    )
    job["strategy"] = GAN_STRATEGIES[name]
    run = train(job)
    rows = [r for r in read_metrics(run) if "train/loss_generator" in r]
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor(r["train/loss_discriminator"])) for r in rows)
    state = torch.load(run / "checkpoints" / "step_2" / "state.pt", weights_only=True)
    assert set(state["strategy"]["optimizers"]) == {"discriminator", "generator"}
