"""`calibration.loop.time_pieces` times a step the way `Trainer.train_step` runs it."""

from __future__ import annotations

import math
from pathlib import Path

from roundhouse.calibration.loop import WARMUP_STEPS, calibration_job, time_pieces
from roundhouse.config.loading import validate_job
from roundhouse.parallel.context import build_local_context
from roundhouse.runs.rundir import run_dir_of
from roundhouse.trainer.run import build_trainer
from roundhouse.weights.checkpoint import Checkpointer


def test_a_task_with_loss_items_counts_them_once_per_timed_step(tmp_path: Path) -> None:
    """A language model's loss is a mean over its global batch's tokens: the loop counts them
    with one `sum_over_replicas` per step (an all-reduce on several ranks), so the probe must
    too, or the plan misses a collective per step."""
    job = validate_job(
        {
            "name": "lm",
            "model": {"name": "gpt", "flavor": "debug"},
            "data": {"source": "builtin:pytext", "options": {"seq_len": 16, "max_bytes": 150000}},
            "trainer": {"device": "cpu"},
            "storage": {"path": str(tmp_path)},
        }
    )
    spec = calibration_job(job, str(tmp_path), 4, {"kind": "single"})
    checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
    trainer = build_trainer(spec, build_local_context("cpu"), checkpointer, None)
    counted: list[float] = []
    original = trainer.strategy.sum_over_replicas

    def counting(value: float) -> float:
        counted.append(value)
        return original(value)

    trainer.strategy.sum_over_replicas = counting
    try:
        pieces = time_pieces(trainer, math.inf, max_steps=3)
    finally:
        trainer.strategy.close()
        trainer.tracker.close()
    assert set(pieces) == {"loop_s", "fwd_bwd_s", "optimizer_s", "step_s"}
    assert pieces["step_s"] >= pieces["fwd_bwd_s"]  # a whole step holds its pieces
    assert len(counted) == WARMUP_STEPS + 3
    assert all(count == 4 * 16 for count in counted)  # 4 sequences of 16 targets, no padding


def test_a_probe_longer_than_an_epoch_goes_on_into_the_next(tmp_path: Path) -> None:
    """A millisecond step needs more timed steps than a small dataset's epoch holds (digits at
    a batch of 512: 3 steps): the timing moves on to the next epoch as the loop does, so the
    medians come from every step asked for."""
    job = validate_job(
        {
            "name": "mlp",
            "model": {"name": "mlp", "flavor": "small"},
            "data": {"source": "builtin:digits"},
            "trainer": {"device": "cpu"},
            "storage": {"path": str(tmp_path)},
        }
    )
    spec = calibration_job(job, str(tmp_path), 512, {"kind": "single"})
    checkpointer = Checkpointer(run_dir_of(spec), keep_last=1, identity={})
    trainer = build_trainer(spec, build_local_context("cpu"), checkpointer, None)
    assert len(trainer.train_loader) == 3
    steps: list[int] = []
    original = trainer.strategy.forward_backward

    def counting(batch: dict, **kwargs: object) -> object:
        steps.append(trainer.train_loader.state_dict()["epoch"])
        return original(batch, **kwargs)

    trainer.strategy.forward_backward = counting
    try:
        pieces = time_pieces(trainer, math.inf, max_steps=6)
    finally:
        trainer.strategy.close()
        trainer.tracker.close()
    assert steps == [0, 0, 0, 1, 1, 1, 2, 2]  # WARMUP_STEPS + 6, over three epochs
    assert pieces["step_s"] > 0
