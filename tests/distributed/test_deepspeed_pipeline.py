"""DeepSpeed pipeline parallel (2 stages on 2 gloo ranks) equals `single` on the same batches.

Every run goes through the real `run_worker(job, ctx)` with 2 micro-batches per step (the
pipeline's micro-batches), Adam and a warmup schedule. Compared with `single`: the logged
`train/loss` and `train/grad_norm` of every step, the validation metrics, and the final
(consolidated) weights. Also: a pipeline checkpoint resumes under the pipeline and under
`single`, continuing the uninterrupted loss curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from torch import nn

from roundhouse import models
from roundhouse.config import DeepSpeedStrategyConfig
from roundhouse.errors import JobFileError, ModelError
from roundhouse.parallel.base import TrainPlan
from roundhouse.parallel.deepspeed.strategy import DeepSpeedStrategy
from roundhouse.parallel.registry import get_strategy_class
from tests.distributed.test_deepspeed_zero import checkpoint_copy, ds_job, losses, train
from tests.distributed.test_ring_training import assert_close_weights
from tests.helpers.runs import final_weights, read_metrics

pytestmark = [pytest.mark.timeout(300)]
VOCAB = 260

GPT = {
    "model": {"name": "gpt", "flavor": "debug", "options": {"tie_weights": False}},
    "data": {
        "source": "builtin:pytext",
        "batch_size": 8,
        "eval_batch_size": 8,
        "options": {"seq_len": 16, "max_bytes": 40000},
    },
}


def pipe_job(
    tmp_path: Path,
    run_id: str,
    kind: str,
    model: str,
    partition: str = "parameters",
    **overrides: Any,
) -> dict:
    settings = {
        "trainer__grad_accum_steps": 2,
        "trainer__grad_clip_norm": 0.5,  # small enough to clip: the norm must span both stages
        "trainer__max_steps": 6,
        **overrides,
    }
    job = ds_job(tmp_path, run_id, 0, **settings)
    if model == "gpt":
        job["model"] = GPT["model"]
        job["data"] = GPT["data"]
    if kind == "single":
        job["strategy"] = {"kind": "single"}
    else:
        stage = int(kind.removeprefix("zero"))
        job["strategy"] = {
            "kind": "deepspeed",
            "zero_stage": stage,
            "pipeline_stages": 2,
            "config": {"pipeline": {"partition": partition}},
        }
    return job


def metric(run: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run) if key in m]


def assert_same_run(ours: Path, reference: Path) -> None:
    assert metric(ours, "train/loss") == pytest.approx(metric(reference, "train/loss"), abs=1e-5)
    norms = metric(reference, "train/grad_norm")
    assert norms and min(norms) > 0.5, "the clipping never acted: the test would say little"
    assert metric(ours, "train/grad_norm") == pytest.approx(norms, rel=1e-4)
    for key in ("val/loss", "val/accuracy", "test/loss"):
        assert metric(ours, key) == pytest.approx(metric(reference, key), abs=1e-5), key
    assert_close_weights(final_weights(ours), final_weights(reference))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "stage", "partition"),
    [("mlp", 0, "parameters"), ("mlp", 1, "uniform"), ("gpt", 0, "parameters")],
)
def test_two_stage_pipeline_equals_single(
    tmp_path: Path, model: str, stage: int, partition: str
) -> None:
    reference = train(pipe_job(tmp_path, "single", "single", model), 1)
    ours = train(pipe_job(tmp_path, "pipe", f"zero{stage}", model, partition), 2)
    assert_same_run(ours, reference)


@pytest.mark.slow
def test_two_stages_times_two_replicas_equal_single(tmp_path: Path) -> None:
    """4 ranks: 2 stages x 2 data-parallel replicas (rank = stage * 2 + dp_rank).

    The logged `train/loss` is rank 0's replica's share of the batch, so only what covers the
    whole batch is compared: gradient norms, evaluation metrics and the final weights.
    """
    reference = train(pipe_job(tmp_path, "single", "single", "mlp"), 1)
    ours = train(pipe_job(tmp_path, "pipe", "zero0", "mlp"), 4)
    norms = metric(reference, "train/grad_norm")
    assert metric(ours, "train/grad_norm") == pytest.approx(norms, rel=1e-4)
    for key in ("val/loss", "val/accuracy", "test/loss"):
        assert metric(ours, key) == pytest.approx(metric(reference, key), abs=1e-5), key
    assert_close_weights(final_weights(ours), final_weights(reference))


WORLD = {"zero1": 2, "single": 1}


@pytest.mark.slow
def test_checkpoints_move_between_pipeline_and_single(tmp_path: Path) -> None:
    """Steps 1-3 under one layout, 4-6 under another == the uninterrupted pipeline run."""
    full = losses(train(pipe_job(tmp_path, "full", "zero1", "mlp"), 2))
    first = {
        kind: train(pipe_job(tmp_path, f"{kind}3", kind, "mlp", trainer__max_steps=3), world)
        for kind, world in WORLD.items()
    }
    for before, after in (("zero1", "zero1"), ("zero1", "single"), ("single", "zero1")):
        case = f"{before}_to_{after}"
        run = checkpoint_copy(first[before], 3, tmp_path / "ds" / case)
        train(pipe_job(tmp_path, case, after, "mlp"), WORLD[after], resume=True)
        resumed = losses(run)
        assert set(resumed) == {4, 5, 6}, case
        for step, loss in resumed.items():
            assert loss == pytest.approx(full[step], abs=1e-5), f"{case}, step {step}"


def pipeline_strategy() -> DeepSpeedStrategy:
    """A 2-stage strategy, not set up (no process group needed)."""
    from tests.distributed.test_ring_training import node_context

    config = DeepSpeedStrategyConfig(kind="deepspeed", zero_stage=0, pipeline_stages=2)
    return get_strategy_class(config)(config, node_context(0, 2, 2))  # the registry's choice


def gpt(**options: Any) -> nn.Module:
    config = models.BuildConfig(input_shape=(16,), num_classes=VOCAB, options=options)
    return models.get("gpt").build(config)


def plan_with(layers: Any) -> TrainPlan:
    return TrainPlan(task=None, build_optimizer=None, build_scheduler=None, pipeline_layers=layers)  # type: ignore[arg-type]


def test_pipeline_refuses_models_it_cannot_split() -> None:
    strategy = pipeline_strategy()
    assert type(strategy).__name__ == "PipelineStrategy"
    gpt_layers = models.get("gpt").pipeline_layers
    assert len(strategy.layers_of(gpt(tie_weights=False), plan_with(gpt_layers))) == 4
    with pytest.raises(JobFileError, match="share a weight"):
        strategy.layers_of(gpt(tie_weights=True), plan_with(gpt_layers))
    with pytest.raises(JobFileError, match="no pipeline_layers"):
        strategy.layers_of(gpt(tie_weights=False), plan_with(None))
    with pytest.raises(JobFileError, match="only 1 pipeline layers"):
        strategy.layers_of(nn.Sequential(nn.Linear(2, 2)), plan_with(lambda m: list(m)))
    with pytest.raises(ModelError, match="leave out parameter"):
        strategy.layers_of(gpt(tie_weights=False), plan_with(lambda m: gpt_layers(m)[:-1]))
    moe = models.get("moe").build(models.BuildConfig(input_shape=(16,), num_classes=VOCAB))
    with pytest.raises(JobFileError, match="auxiliary"):
        strategy.layers_of(moe, plan_with(models.get("moe").pipeline_layers))
