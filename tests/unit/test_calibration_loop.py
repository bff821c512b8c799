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
    assert set(pieces) == {"loop_s", "fwd_bwd_s", "optimizer_s"}
    assert len(counted) == WARMUP_STEPS + 3
    assert all(count == 4 * 16 for count in counted)  # 4 sequences of 16 targets, no padding
