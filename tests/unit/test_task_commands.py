"""Commands ask the task: `--dry-run` and `models summary` feed the model the task's
`example_inputs` (a user's task declares a two-input model's inputs), `export` writes what the
task's `export_module`/`export_inputs` say, and distilling a task with several optimizers is
refused in pre-flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from roundhouse.launch.cli import main
from roundhouse.weights.saved_model import load_saved_model

USER = "tests.helpers.user_tasks"


def job_dict(tmp_path: Path, task: str = "Denoise", **sections: Any) -> dict:
    job = {
        "name": "user",
        "model": {"name": f"{USER}:LevelDenoiser", "options": {"hidden": 8}},
        "task": {"name": f"{USER}:{task}"},
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": 2,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_epoch": False},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(tmp_path / "runs"), "run_id": "r"},
    }
    job.update(sections)
    return job


def run(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(tmp_path: Path, job: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_dry_run_reports_the_inputs_a_user_task_declares(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run(
        capsys, "train", write(tmp_path, job_dict(tmp_path)), "--local", "--dry-run"
    )
    assert code == 0, err
    assert "inputs image (1, 8, 8), level (1,) -> output (1, 8, 8)" in out
    assert not (tmp_path / "runs").exists()


def test_undeclared_inputs_are_one_line_naming_example_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = job_dict(tmp_path, task="UndeclaredDenoise")
    code, _, err = run(capsys, "train", write(tmp_path, job), "--local", "--dry-run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "cannot take input (1, 8, 8)" in lines[0] and "example_inputs" in lines[0]


def test_models_summary_feeds_the_declared_inputs(capsys: pytest.CaptureFixture) -> None:
    task = f"task.name={USER}:Denoise"
    code, out, err = run(
        capsys, "models", "summary", f"{USER}:LevelDenoiser", "--input", "1x8x8", task
    )
    assert code == 0, err
    assert f"task {USER}:Denoise: inputs image (1, 8, 8), level (1,)" in out
    assert "body.2" in out and "64" in out  # the last layer ran: (B, 64) before the reshape
    code, _, err = run(capsys, "models", "summary", f"{USER}:LevelDenoiser", "--input", "1x8x8")
    lines = err.strip().splitlines()  # the model's own task (classification) feeds one input
    assert code == 2 and len(lines) == 1 and "cannot take input (1, 8, 8)" in lines[0], err


def test_export_feeds_a_user_tasks_declared_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", str(write(tmp_path, job_dict(tmp_path))), "--local"]) == 0
    run_dir, out_file = tmp_path / "runs" / "user" / "r", tmp_path / "m.onnx"
    code, out, err = run(capsys, "export", run_dir, "--format", "onnx", "--out", out_file)
    assert code == 0, err
    assert "the model of tests.helpers.user_tasks:LevelDenoiser" in out
    session = ort.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "level"]
    gen = torch.Generator().manual_seed(0)
    image, level = torch.rand(5, 1, 8, 8, generator=gen), torch.rand(5, 1, generator=gen)
    with torch.no_grad():
        expected = load_saved_model(str(run_dir)).model(image, level).numpy()
    got = session.run(None, {"image": image.numpy(), "level": level.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_distilling_a_task_with_several_optimizers_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = job_dict(
        tmp_path,
        model={"name": "dcgan", "flavor": "debug"},
        data={"source": "builtin:digits", "batch_size": 16},
    )
    job["task"] = {"name": "gan"}
    job["trainer"]["distill"] = {"teacher": str(tmp_path / "no_teacher_needed")}
    code, _, err = run(capsys, "train", write(tmp_path, job), "--local", "--dry-run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: trainer.distill cannot train task gan")
    assert "2 optimizers (discriminator, generator)" in lines[0]
    assert "(remove trainer.distill" in lines[0]
    assert main(["train", str(write(tmp_path, job)), "--local"]) == 2
    assert not (tmp_path / "runs").exists()


def test_sample_asks_the_users_task_what_it_draws_and_which_flags_it_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`sample` tests no model family or task name: a user's task says whether it samples,
    which flags it takes and what it prints."""
    job = job_dict(tmp_path, task="DenoiseAndReport")
    assert main(["train", str(write(tmp_path, job)), "--local"]) == 0
    run_dir = tmp_path / "runs" / "user" / "r"
    capsys.readouterr()
    code, out, err = run(capsys, "sample", run_dir, "--prompt", "0.5")
    assert code == 0, err
    model = load_saved_model(str(run_dir)).model.eval()
    with torch.no_grad():
        change = model(torch.zeros(1, 1, 8, 8), torch.full((1, 1), 0.5)).abs().mean().item()
    assert out.strip() == f"level 0.5: mean change {change:.6f}"
    for flags, message in (
        (["--beam", "2"], "--beam: not for task DenoiseAndReport"),
        (["--num", "4"], "--num: not for task"),
    ):
        code, out, err = run(capsys, "sample", run_dir, "--prompt", "0.5", *flags)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def test_sample_refuses_a_task_that_does_not_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", str(write(tmp_path, job_dict(tmp_path))), "--local"]) == 0
    code, _, err = run(
        capsys, "sample", tmp_path / "runs" / "user" / "r", "--out", tmp_path / "x.png"
    )
    assert code == 2 and "cannot sample" in err and not (tmp_path / "x.png").exists()
