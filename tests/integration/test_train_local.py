"""`roundhouse train --local` end to end: run folder, determinism, resume, and bad input.

Most cases call the CLI's `main()` in-process (fast); the exit-code and kill-and-resume tests
run the real console entry point in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from roundhouse.launch.cli import main
from tests.helpers.runs import assert_same_weights, final_weights, only_run, read_metrics

ROOT = Path(__file__).resolve().parents[2]
FAST = {
    "name": "fast",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 32},
    "trainer": {"max_steps": 30, "log_every_steps": 5, "eval_every_steps": 15},
    "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
}


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "fast.yaml"
    job = {**FAST, "storage": {"path": str(tmp_path / "runs")}}
    path.write_text(yaml.safe_dump(job))
    return path


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_local_run_fills_the_run_folder(job_file: Path, tmp_path: Path) -> None:
    assert run_cli("train", job_file, "--local", "tracking.wandb.mode=offline") == 0
    run = only_run(tmp_path / "runs", "fast")
    saved = yaml.safe_load((run / "job.yaml").read_text())
    assert saved["trainer"]["max_steps"] == 30 and saved["storage"]["run_id"] == run.name
    rows = read_metrics(run)
    assert all({"step", "epoch", "time"} <= row.keys() for row in rows)
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    assert {"train/lr", "train/grad_norm", "train/samples_per_s"} <= train[0].keys()
    assert rows[-1]["step"] == 30 and 0.0 <= rows[-1]["test/accuracy"] <= 1.0
    assert [r["epoch"] for r in train] == [0] * 6  # 30 steps of 32 < one epoch of digits
    assert any(r["step"] == 30 and "val/top5_accuracy" in r for r in rows)
    assert (run / "checkpoints" / "latest").read_text() == "step_30"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))


def test_same_job_same_seed_same_weights(job_file: Path, tmp_path: Path) -> None:
    """DESIGN: seeded and deterministic on CPU, bit for bit."""
    augment = [
        "data.augment.rotation=10",
        "data.augment.mixup_alpha=0.2",
        "model.options={dropout: 0.2}",
    ]
    for run_id in ("a", "b"):
        assert run_cli("train", job_file, "--local", f"storage.run_id={run_id}", *augment) == 0
    runs = tmp_path / "runs" / "fast"
    assert_same_weights(final_weights(runs / "a"), final_weights(runs / "b"))
    assert (
        run_cli("train", job_file, "--local", "storage.run_id=c", "trainer.seed=1", *augment) == 0
    )
    other = final_weights(runs / "c")
    assert any(not torch.equal(other[k], v) for k, v in final_weights(runs / "a").items())


def test_resume_latest_continues_the_run(job_file: Path, tmp_path: Path) -> None:
    assert run_cli("train", job_file, "--local", "trainer.max_steps=20") == 0
    assert run_cli("train", job_file, "--local", "--resume", "latest", "trainer.max_steps=40") == 0
    run = only_run(tmp_path / "runs", "fast")
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    straight = tmp_path / "straight"
    assert (
        run_cli("train", job_file, "--local", "trainer.max_steps=40", f"storage.path={straight}")
        == 0
    )
    assert_same_weights(final_weights(run), final_weights(only_run(straight, "fast")))


def test_dry_run_reports_and_writes_nothing(job_file: Path, tmp_path: Path, capsys) -> None:
    assert run_cli("train", job_file, "--local", "--dry-run", "trainer.grad_accum_steps=2") == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "parameters" in out
    assert "global 32 = 1 rank(s) x 2 micro-step(s) x 16 samples per micro-batch" in out
    assert "-> output (10,)" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_checks_the_batch_arithmetic(job_file: Path, capsys) -> None:
    rc = run_cli(
        "train", job_file, "--local", "--dry-run", "data.batch_size=2", "trainer.grad_accum_steps=4"
    )
    assert rc == 2
    assert "1 x 4 = 4" in one_error_line(capsys)
    rc = run_cli("train", job_file, "--dry-run", "cluster.num_workers=2")
    assert rc == 2
    assert "strategy.kind=single runs on one worker" in one_error_line(capsys)


def test_models_and_schema_commands(capsys) -> None:
    assert run_cli("models", "list") == 0
    listing = capsys.readouterr().out
    for name in ("mlp", "lenet", "alexnet", "vgg", "nin", "googlenet", "resnet", "densenet"):
        assert name in listing
    assert run_cli("models", "summary", "resnet:debug", "--input", "1x8x8") == 0
    assert "Linear" in capsys.readouterr().out
    assert run_cli("schema") == 0
    assert '"strategy"' in capsys.readouterr().out


BAD_INPUT = [
    (["trainer.optimzer.lr=1"], "unknown key 'trainer.optimzer'"),
    (["trainer.max_epochs=many"], "trainer.max_epochs"),
    (["data.batch_size=0"], "data.batch_size"),
    (["model.name=transformerish"], "valid models: "),
    (["model.flavor=huge"], "valid flavors"),
    (["trainer.optimizer.name=lion"], "adamw"),
    (["trainer.scheduler.name=onecycle"], "cosine"),
    (["trainer.loss.name=hinge"], "focal"),
    (["strategy.kind=deepspeed", "strategy.tensor_parallel=2"], "does not divide the world size 1"),
]


@pytest.mark.parametrize(("overrides", "fragment"), BAD_INPUT)
def test_bad_job_input_is_one_line(job_file: Path, capsys, overrides, fragment) -> None:
    assert run_cli("train", job_file, "--local", *overrides) == 2
    assert fragment in one_error_line(capsys)


def test_missing_and_invalid_job_files(tmp_path: Path, capsys) -> None:
    assert run_cli("train", tmp_path / "nope.yaml", "--local") == 2
    assert "does not exist" in one_error_line(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [x\n")
    assert run_cli("train", bad, "--local") == 2
    assert "invalid YAML" in one_error_line(capsys)


def test_unwritable_storage_path(job_file: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run_cli("train", job_file, "--local", f"storage.path={blocker}/runs") == 2
    assert "cannot write to storage path" in one_error_line(capsys)


def test_resume_without_a_checkpoint(job_file: Path, capsys) -> None:
    assert run_cli("train", job_file, "--local", "--resume", "latest") == 2
    assert "no checkpoint to resume" in one_error_line(capsys)


def test_resume_with_a_checkpoint_of_another_model(job_file: Path, capsys) -> None:
    assert run_cli("train", job_file, "--local", "trainer.max_steps=5") == 0
    assert run_cli("train", job_file, "--local", "--resume", "latest", "model.name=lenet") == 2
    assert "model='mlp'" in one_error_line(capsys)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(
    job_file: Path, tmp_path: Path, capsys
) -> None:
    diverge = [
        "trainer.optimizer.name=sgd",
        "trainer.optimizer.lr=1e25",
        "trainer.checkpoint.every_steps=1",
    ]
    assert run_cli("train", job_file, "--local", *diverge) == 2
    line = one_error_line(capsys)
    assert "loss is" in line and "at step" in line and "is the last good checkpoint" in line
    run = only_run(tmp_path / "runs", "fast")
    good = int(line.split("step_")[1].split(" ")[0])
    assert (run / "checkpoints" / "latest").read_text() == f"step_{good}"
    assert all(torch.isfinite(w).all() for w in final_weights(run).values())


def test_skip_nonfinite_steps_keeps_training(job_file: Path, tmp_path: Path) -> None:
    diverge = [
        "trainer.optimizer.name=sgd",
        "trainer.optimizer.lr=1e25",
        "trainer.skip_nonfinite_steps=true",
    ]
    assert run_cli("train", job_file, "--local", *diverge) == 0


def cli_subprocess(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "roundhouse.launch.cli", *map(str, args)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_console_script_exit_code_and_debug_traceback(job_file: Path) -> None:
    proc = cli_subprocess("train", job_file, "--local", "model.name=nope")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    proc = cli_subprocess("train", job_file, "--local", "model.name=nope", "--debug")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" in err


@pytest.mark.timeout(240)
def test_sigkill_and_resume_gives_bit_identical_weights(job_file: Path, tmp_path: Path) -> None:
    """Acceptance: a run killed with SIGKILL and resumed ends with the same weights."""
    args = [
        "train",
        job_file,
        "--local",
        "model.name=tests.helpers.models:slow_mlp",
        "trainer.max_steps=150",
        "trainer.checkpoint.every_steps=20",
        "trainer.eval_every_steps=50",
        "data.augment.rotation=10",
        "data.augment.mixup_alpha=0.2",
    ]
    straight = cli_subprocess(*args, "storage.run_id=straight")
    killed = cli_subprocess(*args, "storage.run_id=killed")
    latest = tmp_path / "runs" / "fast" / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 180
    while not (latest.exists() and int(latest.read_text().removeprefix("step_")) >= 40):
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "runs" / "fast" / "killed"
    resumed = cli_subprocess(*args, "--resume", str(run))
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert straight.wait(timeout=180) == 0, straight.stderr.read()
    assert_same_weights(final_weights(run), final_weights(tmp_path / "runs" / "fast" / "straight"))
