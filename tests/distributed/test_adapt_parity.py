"""DESIGN rule 5 for LoRA and distillation: ring, ps and DeepSpeed ZeRO on 2 gloo ranks end
with the weights of `single` on the whole batch. Every run goes through the real `run_worker`.

LoRA checkpoints hold only the adapters, so equal checkpoints mean equal adapters; the frozen
base is the same on every rank by construction (same seed, checked by its sha256 on resume).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import test_deepspeed_zero as zero
from tests.distributed import test_ps_training as ps
from tests.distributed import test_ring_training as ring
from tests.helpers.runs import final_weights
from tests.unit.test_distill import digits_job
from tests.unit.test_lora import train as train_local

LORA = {"rank": 4, "alpha": 8.0, "targets": ["fc1", "head"]}
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def single(job: dict) -> dict:
    job = {**job, "strategy": {"kind": "single"}}
    job["storage"] = {**job["storage"], "run_id": "single"}
    return final_weights(ring.train(job, 1))


def assert_adapters_equal(ours: dict, reference: dict) -> None:
    assert ours and all(".lora_" in k for k in ours), sorted(ours)
    moved = max(float(v.abs().max()) for k, v in ours.items() if "lora_B" in k)
    assert moved > 1e-3, "the adapters barely moved: parity would say little"
    ring.assert_close_weights(ours, reference)


def test_lora_ring_equals_single(tmp_path: Path) -> None:
    job = ring.make_job(tmp_path, "ring", model__lora=LORA)
    assert_adapters_equal(final_weights(ring.train(job, 2)), single(job))


def test_lora_ps_equals_single(tmp_path: Path) -> None:
    job = ps.make_job(tmp_path, "ps", {"num_servers": 2}, model__lora=LORA)
    assert_adapters_equal(final_weights(ps.train(job, 2)), single(job))


@pytest.mark.parametrize("stage", [0, 2])
def test_lora_deepspeed_zero_equals_single(tmp_path: Path, stage: int) -> None:
    job = zero.ds_job(tmp_path, f"zero{stage}", stage, model__lora=LORA)
    assert_adapters_equal(final_weights(zero.train(job, 2)), single(job))


def test_distillation_ring_equals_single(tmp_path: Path) -> None:
    model = {"name": "mlp", "options": {"hidden_sizes": [96]}}
    teacher = train_local(digits_job(tmp_path / "t", "teacher", model, max_steps=10))
    distill = {"teacher": str(teacher), "temperature": 3.0, "alpha": 0.8}
    job = ring.make_job(tmp_path, "ring", trainer__distill=distill)
    ours = final_weights(ring.train(job, 2))
    initial = ring.initial_weights(ring.make_job(tmp_path, "init"))
    assert max(float((ours[k] - initial[k]).abs().max()) for k in ours) > 1e-2
    ring.assert_close_weights(ours, single(job))
