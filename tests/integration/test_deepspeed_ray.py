"""`kind: deepspeed` under Ray: the quickstart and a GPT debug job, then `ckpt export`.

One module-scoped Ray cluster (a real `ray start` head on 127.0.0.1); jobs go through
`roundhouse.launch.cli.main` exactly as a user's `roundhouse train` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from roundhouse.config.loading import load_job
from roundhouse.data import build_splits
from roundhouse.launch.cli import main
from roundhouse.weights.model_build import build_model_for
from tests.helpers.ray_cluster import RayCluster, start_cluster
from tests.helpers.runs import final_weights, only_run, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]
COMMON = ["tracking.wandb.mode=disabled", "tracking.console=off", "cluster.num_workers=2"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    ray_cluster = start_cluster(head_cpus=2, extra_nodes=())
    try:
        with ray_cluster.as_default():
            yield ray_cluster
    finally:
        ray_cluster.stop()


def train(cluster: RayCluster, job_file: Path, storage: Path, *overrides: str) -> Path:
    args = ["train", str(job_file), f"storage.path={storage}", *COMMON, *overrides]
    assert main([*args, "--address", cluster.gcs_address]) == 0
    return only_run(storage, load_job(job_file).name)


def test_quickstart_with_zero2(cluster: RayCluster, tmp_path: Path) -> None:
    run = train(
        cluster,
        ROOT / "configs" / "quickstart.yaml",
        tmp_path / "runs",
        "strategy.kind=deepspeed",
        "strategy.zero_stage=2",
        "trainer.max_epochs=1",
        "trainer.max_steps=12",
        "trainer.log_every_steps=4",
    )
    metrics = read_metrics(run)
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert metrics[-1]["step"] == 12 and "test/accuracy" in metrics[-1]


def test_gpt_debug_job_with_zero3_and_export(
    cluster: RayCluster, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job_file = ROOT / "configs" / "gpt_deepspeed.yaml"
    overrides = ["trainer.max_steps=6", "trainer.log_every_steps=3", "model.flavor=debug"]
    run = train(cluster, job_file, tmp_path / "runs", *overrides)
    assert [m["step"] for m in read_metrics(run) if "train/loss" in m] == [3, 6]
    out = tmp_path / "model.safetensors"
    assert main(["ckpt", "export", str(run), "--to", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    exported = load_file(str(out))
    saved = final_weights(run)
    assert exported.keys() == saved.keys()
    job = load_job(job_file, [*overrides, *COMMON])
    info = build_splits(job.data, seed=job.trainer.seed).info
    model = build_model_for(job, info.input_shape, info.num_classes)
    model.load_state_dict(exported)  # plain PyTorch loads it: every name and shape fits
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_export_names_the_missing_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "runs" / "x" / "r1"
    (run / "checkpoints").mkdir(parents=True)
    code = main(["ckpt", "export", str(run), "--to", str(tmp_path / "m.safetensors")])
    assert code == 2
    assert "no checkpoint" in capsys.readouterr().err
