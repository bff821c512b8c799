"""The GAN's generator weight average (`model.options.ema_decay`) under every strategy on 2 gloo
ranks: the average lives in buffers, so no strategy exchanges or shards it, and the generator's
turn moves it (the checkpoint holds an average between the first and the last weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_ring_training import make_job
from tests.distributed.test_task_optimizers import train
from tests.helpers.runs import final_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STRATEGIES = {
    "ring": {"kind": "ring", "bucket_mb": 0.001},
    "ps": {"kind": "ps", "num_servers": 2, "node_aggregation": False},
    "deepspeed zero2": {"kind": "deepspeed", "zero_stage": 2},
}


def gan_job(tmp_path: Path, run_id: str, strategy: dict, steps: int) -> dict:
    job = make_job(
        tmp_path,
        run_id,
        model={"name": "dcgan", "flavor": "debug", "options": {"ema_decay": 0.5}},
        task={"name": "gan"},
        trainer__max_steps=steps,
        trainer__optimizer={"name": "adam", "lr": 0.01, "betas": [0.5, 0.999]},
        data__batch_size=16,
    )
    job["strategy"] = strategy
    return job


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_the_generator_average_moves_under_every_strategy(tmp_path: Path, name: str) -> None:
    initial = final_weights(train(gan_job(tmp_path, "init", {"kind": "single"}, 0)))
    weights = final_weights(train(gan_job(tmp_path, "dist", STRATEGIES[name], 3)))
    key = "to_image.weight"
    first, last = initial[f"generator.{key}"], weights[f"generator.{key}"]
    average = weights[f"generator_ema.{key}"]
    assert torch.equal(initial[f"generator_ema.{key}"], first)  # the average starts at G
    assert float((last - first).abs().max()) > 1e-3  # the generator trained
    assert float((average - first).abs().max()) > 1e-4  # its average moved,
    assert float((average - last).abs().max()) > 1e-4  # and lags behind it
