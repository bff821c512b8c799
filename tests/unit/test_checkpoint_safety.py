"""Checkpoints that can be trusted: verified on resume, written in the background, and
written on SIGTERM."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from roundhouse.launch.cli import main


def write_job(tmp_path: Path, **trainer) -> Path:
    job = {
        "name": "safety",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": 12,
            "log_every_steps": 4,
            "device": "cpu",
            "optimizer": {"name": "sgd", "lr": 0.1},
            "checkpoint": {"every_steps": 4, "every_epoch": False, "keep_last": 5},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(tmp_path / "runs")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def only_run(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "runs" / "safety").iterdir()
    return run


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_corrupt_checkpoint_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = write_job(tmp_path)
    assert main(["train", str(job), "--local"]) == 0
    run = only_run(tmp_path)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_12"
    flip_a_byte(run / "checkpoints" / "step_12" / "state.pt")
    capsys.readouterr()
    assert main(["train", str(job), "--local", "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: checkpoint file ") and "step_12/state.pt is corrupt" in err[0]
    assert f"--resume {run}/checkpoints/step_8)" in err[0]  # the previous complete one
    # The offered checkpoint resumes (and training ends at max_steps again).
    assert main(["train", str(job), "--local", "--resume", str(run / "checkpoints" / "step_8")]) == 0
