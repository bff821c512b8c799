"""`trainer.compile` and `trainer.precision: bf16` on CPU under every strategy, through the
real `run_worker`: parity with eager fp32 `single` (to a tolerance: inductor reorders
floating-point sums; bf16 rounds to 8 bits of mantissa), checkpoints and resume.

Compiled runs are few and tiny (mlp:debug): inductor compiles slowly on 2 cores, and its
on-disk cache serves the later runs of the same graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_deepspeed_zero import ds_rank
from tests.distributed.test_ps_training import make_job as ps_job
from tests.distributed.test_ps_training import train as ps_train
from tests.distributed.test_ring_training import initial_weights, make_job, train
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
COMPILE_ATOL = 1e-4
DS_TIMEOUT_S = 600
BF16_ATOL = 3e-2  # a few bf16 ulps of weights of magnitude ~1 after 8 SGD steps
# N ranks' bf16 matmuls round each half-batch gradient on its own: not bitwise the single run.
BF16_RANKS_ATOL = 1e-2


def assert_weights_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float
) -> float:
    """Asserts equal keys and weights within `atol`; returns the largest difference."""
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=atol)
        worst = max(worst, float((a[key].float() - b[key].float()).abs().max()))
    return worst


def single(tmp_path: Path, run_id: str, **overrides: Any) -> dict[str, torch.Tensor]:
    job = make_job(tmp_path, run_id, **overrides)
    job["strategy"] = {"kind": "single"}
    return final_weights(train(job, 1))


def test_compiled_single_matches_eager_and_resumes_from_its_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="roundhouse.parallel.compile")
    eager = single(tmp_path, "eager")
    half = make_job(tmp_path, "compiled", trainer__compile=True, trainer__max_steps=4)
    half["strategy"] = {"kind": "single"}
    run = train(half, 1)
    saved = final_weights(run)
    assert not any("_orig_mod" in key for key in saved), "compiled names leaked into state"
    assert saved.keys() == eager.keys()
    whole = {**half, "trainer": {**half["trainer"], "max_steps": 8}}
    resumed = final_weights(train(whole, 1, resume=True))  # same run id: resumes at step 4
    initial = initial_weights(half)
    moved = max(float((eager[k] - initial[k]).abs().max()) for k in eager)
    assert moved > 1e-2, "training barely moved the weights: the parity would say little"
    assert_weights_close(resumed, eager, COMPILE_ATOL)
    assert caplog.text.count("torch.compile (mode=default)") == 2  # both halves compiled


def test_compiled_ring_and_ps_match_eager_single(tmp_path: Path) -> None:
    eager = single(tmp_path, "eager")
    ring = train(make_job(tmp_path, "ring", trainer__compile=True), 2)
    assert_weights_close(final_weights(ring), eager, COMPILE_ATOL)
    ps = ps_job(tmp_path, "ps", {"num_servers": 2, "node_aggregation": False})
    ps["trainer"]["compile"] = True
    assert_weights_close(final_weights(ps_train(ps, 2)), eager, COMPILE_ATOL)


def deepspeed_one_rank(tmp_path: Path, run_id: str, **overrides: Any) -> dict[str, torch.Tensor]:
    """ZeRO-1 on one rank in a child process (DeepSpeed's state stays out of this one)."""
    job = make_job(tmp_path, run_id, **overrides)
    job["strategy"] = {"kind": "deepspeed", "zero_stage": 1}
    prepared = prepare_run(validate_job(job))
    run_distributed(ds_rank, 1, DS_TIMEOUT_S, prepared.job.model_dump(), False)
    return final_weights(Path(prepared.run_dir.url))


def test_compiled_deepspeed_matches_eager_single(tmp_path: Path) -> None:
    """DeepSpeed's engine.compile() on one rank (a DeepSpeed start is slow on 2 cores)."""
    eager = single(tmp_path, "eager")
    assert_weights_close(
        deepspeed_one_rank(tmp_path, "ds", trainer__compile=True), eager, COMPILE_ATOL
    )


def test_bf16_single_ring_and_ps_match_within_bf16_tolerance(tmp_path: Path) -> None:
    fp32 = single(tmp_path, "fp32")
    bf16 = single(tmp_path, "bf16", trainer__precision="bf16")
    gap = assert_weights_close(bf16, fp32, BF16_ATOL)
    assert gap > 1e-6, "bf16 changed nothing: autocast did not run"
    ring = train(make_job(tmp_path, "ring", trainer__precision="bf16"), 2)
    assert_weights_close(final_weights(ring), bf16, BF16_RANKS_ATOL)
    ps = ps_job(tmp_path, "ps", {"num_servers": 2, "node_aggregation": False})
    ps["trainer"]["precision"] = "bf16"
    assert_weights_close(final_weights(ps_train(ps, 2)), bf16, BF16_RANKS_ATOL)


def test_bf16_deepspeed_matches_fp32_single_within_bf16_tolerance(tmp_path: Path) -> None:
    """DeepSpeed keeps bf16 weights (fp32 master copy in the optimizer): compared with fp32."""
    fp32 = single(tmp_path, "fp32")
    assert_weights_close(
        deepspeed_one_rank(tmp_path, "ds", trainer__precision="bf16"), fp32, BF16_ATOL
    )
