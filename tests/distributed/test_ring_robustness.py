"""`ring` beyond the happy path: parameters without gradients, resuming at another world size."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

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


class SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps: time for a failed bucket's error to come back."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        time.sleep(0.5)
        return grad


def backward_after_a_peer_is_gone(
    rank: int, world_size: int, keep_local: bool = False
) -> dict[str, object]:
    """Rank 1 leaves (its process exits); rank 0 then runs a backward whose first bucket's
    all-reduce fails: the backward stops at the next bucket (the middle layer's), before the
    first layer; with `keep_local` it runs to its end and keeps every bucket's gradients."""
    from roundhouse.parallel.buckets import restore_held
    from roundhouse.parallel.ring import OverlappedAllReduce
    from roundhouse.trainer.live_recovery import is_peer_loss

    torch.manual_seed(0)
    first, middle, last = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
    params = [p for layer in (first, middle, last) for p in layer.parameters()]

    def average(buffer: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(buffer)
        return buffer.div_(world_size)

    # a bucket per parameter
    comm = OverlappedAllReduce(params, average, bucket_mb=1e-6, keep_local=keep_local)
    dist.barrier()
    if rank == 1:  # exit once this result is on its way back (as a killed worker would)
        threading.Timer(0.3, os._exit, args=(0,)).start()
        return {}
    time.sleep(1.5)
    comm.begin()
    x = torch.randn(4, 8)
    try:
        last(SlowBackward.apply(middle(first(x)))).sum().backward()
        comm.flush()
        comm.wait()
        error: BaseException | None = None
    except Exception as exc:
        error = exc
    comm.close()
    result = {
        "peer_loss": error is not None and is_peer_loss(error),
        "first_layer_grad": any(p.grad is not None for p in first.parameters()),
    }
    if keep_local:  # the held copies are this rank's own gradients, at any scale
        held = comm.held()
        assert held is not None
        for p in params:
            p.grad = None
        last(middle(first(x))).sum().backward()
        own = [p.grad.clone() for p in params]
        restore_held(held, 0.5)
        result["held_is_own"] = all(
            torch.equal(p.grad, g * 0.5) for p, g in zip(params, own, strict=True)
        )
    return result


def test_a_backward_stops_at_the_first_bucket_launched_after_a_peer_is_lost() -> None:
    """Live recovery starts a backward's worth sooner: a peer lost during the others' forward
    is noticed at their first bucket, and the rest of the backward is not computed."""
    result = run_distributed(backward_after_a_peer_is_gone, 2, 120)[0]
    assert result == {"peer_loss": True, "first_layer_grad": False}


def test_a_backward_keeping_its_gradients_runs_on_after_a_peer_is_lost() -> None:
    """Under live recovery the ring keeps each bucket's own gradients: the backward runs to
    its end, and the copies are this rank's whole gradient (the survivors then redo only the
    lost peer's share)."""
    result = run_distributed(backward_after_a_peer_is_gone, 2, 120, True)[0]
    assert result == {"peer_loss": True, "first_layer_grad": True, "held_is_own": True}
