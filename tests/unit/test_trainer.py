"""The training loop and the single-device strategy, in process."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from roundhouse.config import LossConfig, OptimizerConfig, SchedulerConfig, SingleStrategyConfig
from roundhouse.config.loading import validate_job
from roundhouse.parallel.base import TrainPlan
from roundhouse.parallel.registry import build_strategy
from roundhouse.runs.rundir import run_dir_of
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.losses import build_loss
from roundhouse.trainer.optim import build_optimizer, build_scheduler
from roundhouse.trainer.run import build_trainer
from roundhouse.trainer.task import ClassificationTask
from roundhouse.weights.checkpoint import Checkpointer
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.runs import final_weights, read_metrics


def make_job(tmp_path: Path, **trainer) -> dict:
    return {
        "name": "unit",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": 12,
            "log_every_steps": 1,
            "optimizer": {"name": "sgd", "lr": 0.1},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(tmp_path)},
    }


def train(job_dict: dict) -> Path:
    prepared = prepare_run(validate_job(job_dict))
    run_worker(prepared.job, build_local_context("cpu"))
    return Path(prepared.run_dir.url)


def test_gradient_accumulation_equals_the_whole_batch(tmp_path: Path) -> None:
    """2 micro-batches of 16 give the update of one batch of 32 (loss scaled by micro size)."""
    whole = train(make_job(tmp_path / "a"))
    accum = train(make_job(tmp_path / "b", grad_accum_steps=2))
    a, b = final_weights(whole), final_weights(accum)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    losses = [r["train/loss"] for r in read_metrics(accum) if "train/loss" in r]
    assert losses == pytest.approx(
        [r["train/loss"] for r in read_metrics(whole) if "train/loss" in r], abs=1e-5
    )


def test_early_stopping_stops_after_patience_evaluations(tmp_path: Path) -> None:
    rule = {"metric": "val/loss", "mode": "min", "patience": 2, "min_delta": 100.0}
    run = train(make_job(tmp_path, max_steps=50, eval_every_steps=1, early_stopping=rule))
    rows = read_metrics(run)
    assert max(r["step"] for r in rows) == 3  # best at step 1, no improvement at 2 and 3


def test_early_stopping_on_an_unknown_metric_names_the_valid_ones(tmp_path: Path) -> None:
    rule = {"metric": "val/f1", "mode": "max", "patience": 2}
    with pytest.raises(Exception, match="val/accuracy"):
        train(make_job(tmp_path, eval_every_steps=1, early_stopping=rule))


def single_strategy(model: nn.Module, clip: float | None):
    plan = TrainPlan(
        task=ClassificationTask(build_loss(LossConfig())),
        build_optimizer=functools.partial(
            build_optimizer, config=OptimizerConfig(name="sgd", lr=1.0, momentum=0.0)
        ),
        build_scheduler=functools.partial(
            build_scheduler, config=SchedulerConfig(), steps_per_epoch=1, total_steps=1
        ),
        grad_clip_norm=clip,
    )
    strategy = build_strategy(SingleStrategyConfig(), build_local_context("cpu"))
    strategy.setup(model, plan)
    return strategy


@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_gradient_clipping_caps_the_update_norm(clip: float) -> None:
    """SEEDS F45 (S3:1851): if ||g|| > theta then ||g_clipped|| = theta, else g is unchanged."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    strategy = single_strategy(model, clip)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    batch = {"input": torch.randn(8, 4) * 10, "target": torch.randint(0, 3, (8,))}
    strategy.forward_backward(batch, loss_scale=1.0, sync=True)
    stats = strategy.optimizer_step(need_grad_norm=True)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert stats.grad_norm is not None and stats.grad_norm > 0.05
    expected = min(clip, stats.grad_norm)
    assert step.norm().item() == pytest.approx(expected, rel=1e-4)


def test_evaluation_uses_eval_mode(tmp_path: Path) -> None:
    """Dropout is off while evaluating: two evaluations agree; training mode comes back."""
    job = validate_job(make_job(tmp_path))
    job.model.options = {"dropout": 0.5}
    prepared = prepare_run(job)
    checkpointer = Checkpointer(run_dir_of(prepared.job), keep_last=1, identity={})
    trainer = build_trainer(prepared.job, build_local_context("cpu"), checkpointer, None)
    first, second = trainer.evaluate("val"), trainer.evaluate("val")
    assert first == second
    assert not trainer.strategy.model.training
    trainer.tracker.close()


def test_a_step_is_validated_once_when_eval_steps_meet_the_epoch_end(tmp_path: Path) -> None:
    """digits' 1438 training samples at batch 719 are 2 steps per epoch; eval every 2 steps."""
    job = make_job(tmp_path, max_steps=6, eval_every_steps=2)
    job["data"]["batch_size"] = 719
    rows = read_metrics(train(job))
    val_steps = [r["step"] for r in rows if "val/loss" in r]
    assert val_steps == [2, 4, 6]
