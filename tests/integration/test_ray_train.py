"""`roundhouse train` on an embedded Ray cluster: 2 workers equal one process on the whole batch
(in-memory data, and a prepared dataset each worker streams its own partition of)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from roundhouse.data.streaming import PrepareOptions, WriteConfig, prepare
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
    for rank in (0, 1):  # the embedded cluster lives on loopback only
        record = json.loads((ray_run / "ranks" / f"rank_{rank}.json").read_text())
        assert record["node_ip"] == "127.0.0.1", record


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_workers_stream_their_partitions_of_a_prepared_dataset(tmp_path: Path) -> None:
    """Each Ray worker streams its own partition from storage: 2 workers == 1 local process."""
    url = str(tmp_path / "digits")
    prepare("builtin:digits", url, PrepareOptions(), WriteConfig(shard_bytes=120_000))
    job = {**JOB, "data": {"train": {"url": url}, "batch_size": 32, "shuffle_buffer": 256}}
    job_file = tmp_path / "stream.yaml"
    job_file.write_text(yaml.safe_dump(job))
    ray_runs, local_runs = tmp_path / "ray-runs", tmp_path / "local-runs"
    assert main(["train", str(job_file), "strategy.kind=ring", f"storage.path={ray_runs}"]) == 0
    assert main(["train", str(job_file), "--local", f"storage.path={local_runs}"]) == 0
    ray_run, local_run = only_run(ray_runs, "ray"), only_run(local_runs, "ray")
    ours, reference = final_weights(ray_run), final_weights(local_run)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-5)
    rows = read_metrics(ray_run)
    assert rows[-1]["step"] == 20 and "test/accuracy" in rows[-1]  # test split streamed too
