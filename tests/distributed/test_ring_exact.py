"""`strategy.exact`: the weights do not depend on the number of workers, bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.trainer.preflight import preflight
from tests.distributed.test_ring_training import make_job, train
from tests.helpers.runs import assert_same_weights, final_weights

EXACT = {"strategy__exact": True, "strategy__virtual_shards": 6}


def exact_job(tmp_path: Path, run_id: str) -> dict:
    job = make_job(tmp_path, run_id, **EXACT)
    job["data"]["batch_size"] = 60
    return job


def test_one_two_and_three_workers_end_bit_identical(tmp_path: Path) -> None:
    one = final_weights(train(exact_job(tmp_path, "one"), 1))
    two = final_weights(train(exact_job(tmp_path, "two"), 2))
    three = final_weights(train(exact_job(tmp_path, "three"), 3))
    assert_same_weights(one, two)
    assert_same_weights(one, three)
    # And it trains like the default ring (same batches, another order of additions).
    plain = make_job(tmp_path, "plain")
    plain["data"]["batch_size"] = 60
    default = final_weights(train(plain, 2))
    for key in default:
        torch.testing.assert_close(one[key], default[key], rtol=0, atol=1e-5)


def test_exact_mode_refuses_too_few_shards_and_accumulation(tmp_path: Path) -> None:
    job = exact_job(tmp_path, "bad")
    job["cluster"] = {"num_workers": 8}
    with pytest.raises(JobFileError, match="virtual_shards=6 is below the 8 workers"):
        preflight(validate_job(job))
    job = exact_job(tmp_path, "bad")
    job["trainer"]["grad_accum_steps"] = 2
    with pytest.raises(JobFileError, match="grad_accum_steps=2 has no meaning"):
        preflight(validate_job(job), 1)
