"""DeepSpeed ZeRO 0-3 (and ZeRO-2 with CPU optimizer offload) on 2 gloo ranks equal `single`.

Every run goes through the real `run_worker(job, ctx)`: the same job, the same global batch, an
Adam optimizer (so the optimizer state ZeRO partitions matters) and a warmup schedule.
Also: resume 2 -> 1 -> 2 ranks for each stage continues the loss curve of an uninterrupted run
(DeepSpeed itself cannot change the world size of a ZeRO-1/2 checkpoint of a plain model).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from roundhouse.config.loading import validate_job
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_ring_training import assert_close_weights, initial_weights, make_job
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights, read_metrics

TIMEOUT_S = 300
pytestmark = [pytest.mark.timeout(600)]


def ds_job(storage: Path, run_id: str, stage: int, **overrides: Any) -> dict:
    job = make_job(
        storage,
        run_id,
        trainer__optimizer={"name": "adam", "lr": 0.01, "weight_decay": 0.01},
        trainer__scheduler={"name": "constant", "warmup_steps": 3},  # total-independent,
        trainer__log_every_steps=1,
        data__batch_size=32,
        **overrides,
    )
    job["name"] = "ds"
    job["strategy"] = {"kind": "deepspeed", "zero_stage": stage}
    return job


def ds_rank(rank: int, world_size: int, job: dict, resume: bool) -> None:
    from tests.distributed.test_ring_training import node_context

    run_worker(validate_job(job), node_context(rank, world_size, world_size), resume=resume)


def train(job: dict, world_size: int, resume: bool = False) -> Path:
    prepared = prepare_run(validate_job(job))
    if job["strategy"]["kind"] == "single":
        run_worker(prepared.job, build_local_context("cpu"), resume=resume)
    else:  # one rank too: in a child process, with its own process group
        run_distributed(ds_rank, world_size, TIMEOUT_S, prepared.job.model_dump(), resume)
    return Path(prepared.run_dir.url)


def reference(tmp_path: Path, **overrides: Any) -> Path:
    job = ds_job(tmp_path, "single", 0, **overrides)
    job["strategy"] = {"kind": "single"}
    return train(job, 1)


ZERO_CASES = {
    "zero1": {"strategy": {"kind": "deepspeed", "zero_stage": 1}},
    "zero2": {"strategy": {"kind": "deepspeed", "zero_stage": 2}},
    "zero3": {"strategy": {"kind": "deepspeed", "zero_stage": 3}},
    "zero2 cpu offload": {
        "strategy": {"kind": "deepspeed", "zero_stage": 2, "offload_optimizer": "cpu"}
    },
}


@pytest.mark.slow
def test_zero_stages_equal_single(tmp_path: Path) -> None:
    single = reference(tmp_path, trainer__grad_accum_steps=2)
    expected = final_weights(single)
    initial = initial_weights(ds_job(tmp_path, "init", 0))
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-2, "training barely moved the weights: the 1e-5 parity would say little"
    single_norms = [m["train/grad_norm"] for m in read_metrics(single) if "train/grad_norm" in m]
    for case, override in ZERO_CASES.items():
        job = ds_job(tmp_path, case.replace(" ", "_"), 0, trainer__grad_accum_steps=2)
        job["strategy"] = override["strategy"]
        run = train(job, 2)
        assert_close_weights(final_weights(run), expected)
        norms = [m["train/grad_norm"] for m in read_metrics(run) if "train/grad_norm" in m]
        assert norms == pytest.approx(single_norms, rel=1e-4), case


def losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in read_metrics(run) if "train/loss" in m}


def checkpoint_copy(run: Path, step: int, dest: Path) -> Path:
    """A new run folder holding only checkpoint `step` of `run` (to resume from)."""
    shutil.copytree(run, dest)
    (dest / "metrics.jsonl").unlink()
    (dest / "checkpoints" / "latest").write_text(f"step_{step}")
    for other in (dest / "checkpoints").glob("step_*"):
        if other.name != f"step_{step}":
            shutil.rmtree(other)
    return dest


@pytest.mark.slow
# Stage 1 writes the same checkpoint layout as stage 2 (optimizer state in per-rank
# partitions; gradients are not saved), so stage 2 covers it.
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_at_other_world_sizes(tmp_path: Path, stage: int) -> None:
    """2 ranks for steps 1-3, 1 rank for steps 4-5, 2 ranks for 6-8 == uninterrupted runs.

    The logged `train/loss` is rank 0's share of the batch, so each resumed segment is compared
    with an uninterrupted run at its own world size.
    """
    full = {n: losses(train(ds_job(tmp_path, f"full{n}", stage), n)) for n in (1, 2)}
    first = train(ds_job(tmp_path, "a", stage, trainer__max_steps=3), 2)
    run_b = checkpoint_copy(first, 3, tmp_path / "ds" / "b")
    resumed_1 = train_resume(ds_job(tmp_path, "b", stage, trainer__max_steps=5), run_b, 1)
    run_c = checkpoint_copy(run_b, 5, tmp_path / "ds" / "c")
    resumed_2 = train_resume(ds_job(tmp_path, "c", stage), run_c, 2)
    assert set(resumed_1) == {4, 5} and set(resumed_2) == {6, 7, 8}
    for world, resumed in ((1, resumed_1), (2, resumed_2)):
        for step, loss in resumed.items():
            expected = full[world][step]
            assert loss == pytest.approx(expected, abs=1e-5), f"stage {stage}, step {step}"


def train_resume(job: dict, run: Path, world_size: int) -> dict[int, float]:
    train(job, world_size, resume=True)
    return losses(run)


def shared_memory_op_rank(rank: int, world_size: int, extensions: str) -> dict[str, Any]:
    import os

    import torch

    os.environ["TORCH_EXTENSIONS_DIR"] = extensions  # where a JIT build would go
    from roundhouse.parallel.deepspeed.strategy import init_deepspeed_dist
    from tests.distributed.test_ring_training import node_context

    init_deepspeed_dist(node_context(rank, world_size, world_size))
    from deepspeed.comm import comm

    tensor = torch.full((3,), float(rank + 1))
    comm.inference_all_reduce(tensor)  # what AutoTP's layers call in inference mode
    return {"op": comm.cdb.shm_comm_op, "sum": tensor.tolist()}


def test_deepspeed_on_cpu_builds_no_shared_memory_op(tmp_path: Path) -> None:
    """`init_distributed` on CPU no longer JIT-builds `deepspeed_shm_comm` (~45 s, g++); the
    inference all-reduce that was its only user still sums over the gloo group."""
    extensions = tmp_path / "extensions"
    extensions.mkdir()
    results = run_distributed(shared_memory_op_rank, 2, 120, str(extensions))
    assert [r["op"] for r in results] == [None, None]
    assert [r["sum"] for r in results] == [[3.0, 3.0, 3.0]] * 2
    assert list(extensions.iterdir()) == []
