"""The planner's exchange probe, for real: 2 spawned gloo ranks train the job itself (and a ps
shard process serves it) through roundhouse's loop pieces, timing each family's step."""

from __future__ import annotations

import pytest

from roundhouse.config.loading import validate_job
from roundhouse.planner import exchangecal
from roundhouse.planner.exchangecal import Probe


@pytest.mark.timeout(180)
def test_the_probe_times_the_jobs_step_under_ring_and_ps_on_two_ranks() -> None:
    job = validate_job(
        {
            "name": "probe",
            "model": {"name": "mlp", "options": {"hidden_sizes": [32]}},
            "data": {"source": "builtin:digits", "batch_size": 16},
            "trainer": {"optimizer": {"name": "adam"}},
            "strategy": {"kind": "ring"},
            "cluster": {"num_workers": 2, "cpus_per_worker": 1},
            "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        }
    )
    strategies = {"ring": {"kind": "ring"}, "ps": {"kind": "ps", "mode": "sync", "num_servers": 2}}
    probe = Probe("job", job.model_dump(mode="json"), strategies, steps=3, batch=16)
    measured = exchangecal.measure_families(1, [probe])
    assert sorted(measured) == ["job/ps", "job/ring"]
    # a step of an 8-sample micro-batch with an exchange: more than nothing, far under a second
    assert all(0.0001 < seconds < 1.0 for seconds in measured.values()), measured
