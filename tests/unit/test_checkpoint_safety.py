"""Checkpoints that can be trusted: verified on resume, written in the background, and
written on SIGTERM."""

from __future__ import annotations

import json
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
from roundhouse.runs.rundir import RunDir
from roundhouse.weights.checkpoint import Checkpointer
from tests.helpers.runs import assert_same_weights, final_weights, read_metrics


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
    tmp_path.mkdir(parents=True, exist_ok=True)
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
    previous = str(run / "checkpoints" / "step_8")
    assert main(["train", str(job), "--local", "--resume", previous]) == 0


def run_main(*argv: str) -> None:
    assert main(list(argv)) == 0


def test_resume_from_async_checkpoints_is_bit_identical(tmp_path: Path) -> None:
    """Async saves snapshot the state of their step: a run stopped at 8 and resumed from its
    async checkpoint ends with the weights of an uninterrupted synchronous run."""
    sync = write_job(tmp_path / "sync")
    run_main("train", str(sync), "--local")
    job = write_job(tmp_path / "async", checkpoint={"every_steps": 4, "async": True})
    run_main("train", str(job), "--local", "trainer.max_steps=8")
    run_main("train", str(job), "--local", "--resume", "latest")
    a, b = only_run(tmp_path / "sync"), only_run(tmp_path / "async")
    assert_same_weights(final_weights(a), final_weights(b))
    step_4 = [torch.load(r / "checkpoints/step_4/state.pt", weights_only=True) for r in (a, b)]
    assert_same_weights(step_4[0]["strategy"]["model"], step_4[1]["strategy"]["model"])


KILLED_MID_SAVE = """
import sys, time
from pathlib import Path
from roundhouse.runs.rundir import RunDir
from roundhouse.launch.cli import main

original = RunDir.write_bytes
def slow_write(self, name, data):
    if name.endswith("step_8/state.pt"):
        Path(sys.argv[2]).write_text("writing")  # the save is in flight: kill me now
        time.sleep(120)
    return original(self, name, data)
RunDir.write_bytes = slow_write
sys.exit(main(["train", sys.argv[1], "--local"]))
"""


def test_a_kill_during_an_async_save_leaves_latest_on_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    job = write_job(tmp_path, checkpoint={"every_steps": 4, "async": True})
    script, marker = tmp_path / "killed.py", tmp_path / "in_flight"
    script.write_text(KILLED_MID_SAVE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.Popen([sys.executable, str(script), str(job), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, "the run ended before its step-8 save"
            assert time.monotonic() < deadline, "the step-8 save never started"
            time.sleep(0.1)
        # The loop does not wait for the write: it trains on to step 12 and logs it.
        while not any(row["step"] == 12 for row in read_metrics(only_run(tmp_path))):
            assert time.monotonic() < deadline, "the loop blocked on the background write"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    run = only_run(tmp_path)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"
    assert not (run / "checkpoints" / "step_8" / "manifest.json").exists()
    ckpt = Checkpointer(RunDir(str(run)), keep_last=5, identity={})
    assert ckpt.complete_steps() == [4]
    ckpt.verify(4)
    run_main("train", str(job), "--local", "--resume", "latest")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_12"


def reached_step(tmp_path: Path, step: int) -> bool:
    runs = tmp_path / "runs" / "safety"
    metrics = [run / "metrics.jsonl" for run in runs.glob("*")]
    if not metrics or not metrics[0].exists():
        return False
    try:
        return any(row["step"] >= step for row in read_metrics(metrics[0].parent))
    except ValueError:  # a line being written
        return False


def test_sigterm_writes_a_checkpoint_and_the_resumed_run_is_bit_identical(
    tmp_path: Path,
) -> None:
    """SIGTERM mid-run: a complete checkpoint at the next step boundary, one line, exit 143;
    `--resume latest` then ends with the weights of an uninterrupted run."""
    slow = {"name": "tests.helpers.models:slow_mlp", "flavor": "default"}
    jobs = []
    for name in ("whole", "preempted"):
        job = write_job(tmp_path / name, max_steps=30, checkpoint={"every_epoch": False})
        job.write_text(yaml.safe_dump({**yaml.safe_load(job.read_text()), "model": slow}))
        jobs.append(job)
    reference, job = jobs
    run_main("train", str(reference), "--local")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "roundhouse.launch.cli", "train", str(job), "--local"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not reached_step(tmp_path / "preempted", 4):
            assert proc.poll() is None and time.monotonic() < deadline, "no step 4"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    run = only_run(tmp_path / "preempted")
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert 4 <= step < 30
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"preempted at step {step}: checkpoint" in lines[0], err
    assert "--resume latest" in lines[0]
    assert json.loads((run / "status.json").read_text())["status"] == "preempted"
    run_main("train", str(job), "--local", "--resume", "latest")
    assert_same_weights(final_weights(only_run(tmp_path / "whole")), final_weights(run))
