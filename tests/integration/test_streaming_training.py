"""Training on prepared datasets (`data.train.url`): local folder, resume, ranks, bad data.

The S3 end-to-end run is in `test_streaming_s3.py` (it shares the moto server fixture there).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from roundhouse.config.loading import validate_job
from roundhouse.data.streaming import PrepareOptions, WriteConfig, prepare
from roundhouse.launch.cli import main
from roundhouse.trainer import WorkerContext, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.dist import run_distributed
from tests.helpers.runs import assert_same_weights, final_weights, only_run, read_metrics

TIMEOUT_S = 180
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """builtin:digits prepared into a local folder: 4 train shards of 64-row blocks."""
    url = str(tmp_path_factory.mktemp("prepared") / "digits")
    prepare(
        "builtin:digits",
        url,
        PrepareOptions(),
        WriteConfig(shard_bytes=120_000, block_rows=64, codec="none"),
    )
    return url


def make_job(storage: Path, url: str, **data: Any) -> dict:
    return {
        "name": "stream",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"train": {"url": url}, "batch_size": 32, "shuffle_buffer": 256, **data},
        "trainer": {
            "max_steps": 12,
            "log_every_steps": 4,
            "device": "cpu",
            "optimizer": {"name": "sgd", "lr": 0.1},
            "checkpoint": {"every_epoch": False},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage)},
    }


def write_job(tmp_path: Path, job: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_cli(*args: Any) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_prepared_digits_train_as_well_as_builtin_digits(tmp_path: Path, digits_url: str) -> None:
    job = make_job(tmp_path / "runs", digits_url)
    job["trainer"] |= {"max_steps": None, "max_epochs": 3, "optimizer": {"name": "adam"}}
    path = write_job(tmp_path, job)
    assert run_cli("train", path, "--local", "storage.run_id=streamed") == 0
    builtin = ["data.train=null", "data.source=builtin:digits", "storage.run_id=memory"]
    assert run_cli("train", path, "--local", *builtin) == 0
    runs = tmp_path / "runs" / "stream"
    streamed, memory = read_metrics(runs / "streamed")[-1], read_metrics(runs / "memory")[-1]
    # The same samples (prepare keeps builtin:digits' seeded split), shuffled another way.
    assert streamed["test/accuracy"] > 0.7
    assert abs(streamed["test/accuracy"] - memory["test/accuracy"]) < 0.06
    assert streamed["step"] == memory["step"] == 3 * 45


def test_resume_mid_epoch_equals_an_uninterrupted_run(tmp_path: Path, digits_url: str) -> None:
    path = write_job(tmp_path, make_job(tmp_path / "runs", digits_url))
    assert run_cli("train", path, "--local", "trainer.max_steps=5", "storage.run_id=cut") == 0
    # Resumed with a loader worker process: the position and the order do not depend on it.
    resumed = ["--resume", "latest", "trainer.max_steps=12", "data.num_workers=1"]
    assert run_cli("train", path, "--local", *resumed) == 0
    assert run_cli("train", path, "--local", "storage.run_id=straight") == 0
    runs = tmp_path / "runs" / "stream"
    state = torch.load(runs / "cut" / "checkpoints" / "step_5" / "state.pt", weights_only=True)
    assert state["data"] == {"epoch": 0, "steps_done": 5, "samples_done": 160}
    assert_same_weights(final_weights(runs / "cut"), final_weights(runs / "straight"))


def test_dry_run_reads_shapes_from_the_index(tmp_path: Path, digits_url: str, capsys) -> None:
    path = write_job(tmp_path, make_job(tmp_path / "runs", digits_url, remainder="pad"))
    assert run_cli("train", path, "--local", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "input (1, 8, 8) -> output (10,)" in out
    assert "train 1438, val 179, test 180" in out and "45 per epoch" in out  # 1438/32 padded


def test_corrupt_shard_is_skipped_and_counted(tmp_path: Path, digits_url: str, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(digits_url, broken)
    shard = broken / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    path = write_job(tmp_path, make_job(tmp_path / "runs", str(broken)))
    assert run_cli("train", path, "--local", "storage.run_id=stop") == 2
    assert "shard train-00001.parquet" in one_error_line(capsys)
    assert run_cli("train", path, "--local", "data.on_corrupt=skip", "storage.run_id=skip") == 0
    rows = [r for r in read_metrics(tmp_path / "runs" / "stream" / "skip") if "train/loss" in r]
    assert [r["data/corrupt_shards_skipped"] for r in rows] == [1.0, 1.0, 1.0]


def test_data_that_does_not_fit_the_model_is_one_line(
    tmp_path: Path, digits_url: str, capsys
) -> None:
    path = write_job(tmp_path, make_job(tmp_path / "runs", digits_url))
    assert run_cli("train", path, "--local", "model.name=gpt") == 2
    assert "field 'input'" in one_error_line(capsys)
    other = str(tmp_path / "wide")
    prepare(
        "builtin:synthetic",
        other,
        PrepareOptions(source_options={"shape": [1, 4, 4], "num_samples": 64}),
        WriteConfig(),
    )
    assert run_cli("train", path, "--local", f"data.val.url={other}") == 2
    assert "data.val" in one_error_line(capsys)
    assert run_cli("train", path, "--local", "data.source=builtin:digits") == 2
    assert "exclude each other" in one_error_line(capsys)
    assert run_cli("train", path, "--local", "data.train.url=" + str(tmp_path / "none")) == 2
    assert "index not found" in one_error_line(capsys)


def train_rank(rank: int, world_size: int, job: dict, resume: bool) -> None:
    ctx = WorkerContext(
        rank=rank,
        world_size=world_size,
        local_rank=rank,
        local_world_size=world_size,
        node_rank=0,
        num_nodes=1,
        device=torch.device("cpu"),
    )
    run_worker(validate_job(job), ctx, resume=resume)


def train(job: dict, world_size: int, resume: bool = False) -> Path:
    prepared = prepare_run(validate_job(job))
    run_distributed(train_rank, world_size, TIMEOUT_S, prepared.job.model_dump(), resume)
    return Path(prepared.run_dir.url)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S + 60)
def test_two_ring_ranks_equal_one_and_resume_at_another_world(
    tmp_path: Path, digits_url: str
) -> None:
    """Each rank streams its own partition; 2 ranks end where 1 does, also resumed from 2 to 1."""
    job = make_job(tmp_path / "runs", digits_url, remainder="pad")
    single = job | {"storage": {"path": str(tmp_path / "runs"), "run_id": "single"}}
    prepared = prepare_run(validate_job(single))
    from roundhouse.trainer import build_local_context

    run_worker(prepared.job, build_local_context("cpu"))
    reference = final_weights(Path(prepared.run_dir.url))

    ring = job | {"strategy": {"kind": "ring"}, "storage": {**job["storage"], "run_id": "ring"}}
    assert_close(final_weights(train(ring, 2)), reference)

    cut = ring | {"storage": {**job["storage"], "run_id": "elastic"}}
    cut["trainer"] = {**job["trainer"], "max_steps": 7}
    train(cut, 2)
    cut["trainer"] = {**job["trainer"], "max_steps": 12}
    cut["strategy"] = {"kind": "single"}
    prepared = prepare_run(validate_job(cut), resume="latest")
    run_worker(prepared.job, build_local_context("cpu"), resume=True)
    assert_close(final_weights(Path(prepared.run_dir.url)), reference)


@pytest.mark.slow
def test_gpt_learns_prepared_pytext(tmp_path: Path, capsys):
    url = str(tmp_path / "pytext")
    prepare(
        "builtin:pytext",
        url,
        PrepareOptions(source_options={"seq_len": 32, "max_bytes": 150_000}),
        WriteConfig(),
    )
    args = [
        "train",
        str(ROOT / "configs" / "gpt_pytext.yaml"),
        "--local",
        "data.source=null",
        f"data.train.url={url}",
        "data.options={}",
        "model.flavor=debug",
        "trainer.max_steps=20",
        "trainer.log_every_steps=1",
        "trainer.scheduler.name=constant",
        "trainer.optimizer.lr=0.003",
        "data.batch_size=16",
        "tracking.wandb.mode=disabled",
        "tracking.console=off",
        f"storage.path={tmp_path / 'runs'}",
    ]
    assert main(args) == 0
    rows = read_metrics(only_run(tmp_path / "runs", "gpt_pytext"))
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert rows[-1]["test/bits_per_byte"] > 0
    assert main([*args, "model.name=mlp", "storage.run_id=x"]) == 2
    assert "has no field 'target' with class labels" in capsys.readouterr().err
