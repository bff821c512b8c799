"""`roundhouse train` on an embedded Ray cluster: 2 workers equal one process on the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from roundhouse.launch.cli import main
from tests.helpers.runs import final_weights, only_run, read_metrics

JOB = {
    "name": "ray",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 32},
    "trainer": {"max_steps": 20, "log_every_steps": 5, "optimizer": {"name": "sgd", "lr": 0.1}},
    "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
    "cluster": {"num_workers": 2, "cpus_per_worker": 1},
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ray_workers_with_ring_equal_one_local_process(tmp_path: Path, capsys) -> None:
    job_file = tmp_path / "ray.yaml"
    job_file.write_text(yaml.safe_dump(JOB))
    ray_runs, local_runs = tmp_path / "ray-runs", tmp_path / "local-runs"
    assert main(["train", str(job_file), "strategy.kind=ring", f"storage.path={ray_runs}"]) == 0
    assert "test/accuracy=" in capsys.readouterr().out  # the driver reports the final metrics
    assert main(["train", str(job_file), "--local", f"storage.path={local_runs}"]) == 0
    ray_run, local_run = only_run(ray_runs, "ray"), only_run(local_runs, "ray")
    ours, reference = final_weights(ray_run), final_weights(local_run)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5)
    assert read_metrics(ray_run)[-1]["step"] == 20
