"""`ring` beyond the happy path: parameters without gradients, resuming at another world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_ring_training import (
    TIMEOUT_S,
    assert_close_weights,
    initial_weights,
    make_job,
    single_reference,
    train,
    train_rank,
)
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights, read_metrics

BRANCHY = "tests.helpers.models:branchy_mlp"


def test_unused_branch_does_not_hang(tmp_path: Path) -> None:
    """Ranks disagree on whether `branch` runs; `unused` never runs anywhere.

    Asserts: the run finishes within the timeout with all its steps, `branch` trained, and
    `unused` kept its initial weights (no rank had a gradient, so the optimizer skipped it, as
    on one device: even with weight decay, which would move a zero-gradient parameter).
    """
    job = make_job(tmp_path, "branchy", model__name=BRANCHY, model__flavor="default")
    job["trainer"]["optimizer"] = {"name": "sgd", "lr": 0.1, "weight_decay": 0.01}
    run = train(job, 3)
    ours, initial = final_weights(run), initial_weights(job)
    assert read_metrics(run)[-1]["step"] == 8
    assert not torch.equal(ours["branch.weight"], initial["branch.weight"])
    for key in ("unused.weight", "unused.bias"):
        assert torch.equal(ours[key], initial[key]), key


def run_phase(job: dict, world_size: int, *, resume: Path | None = None) -> Path:
    if resume is None:
        return train(job, world_size)
    prepared = prepare_run(validate_job(job), resume=str(resume))
    if world_size == 1:  # `--local`: rank 0 of 1, no process group
        run_worker(prepared.job, build_local_context("cpu"), resume=True)
    else:
        run_distributed(train_rank, world_size, TIMEOUT_S, job, 1, True)
    return Path(prepared.run_dir.url)


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_at_another_world_size(tmp_path: Path, before: int, after: int) -> None:
    """Train 4 steps on `before` workers, resume for 4 more on `after` workers.

    The ring's state is replicated and the loader's global batches do not depend on the world
    size, so the resumed run must end where an uninterrupted single-device run of 8 steps ends
    (within 1e-5, the parity tolerance), and its metrics continue at step 5 with a loss below
    the first one logged.
    """
    run = run_phase(make_job(tmp_path, "resume", trainer__max_steps=4), before)
    assert (run / "checkpoints" / "latest").read_text() == "step_4"
    assert run_phase(make_job(tmp_path, "resume"), after, resume=run) == run
    assert_close_weights(final_weights(run), single_reference(tmp_path))
    train_rows = [r for r in read_metrics(run) if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
