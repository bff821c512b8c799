"""`roundhouse runs list|compare|plot` on real run folders written by `train --local`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from roundhouse.launch.cli import main
from roundhouse.runs.reader import list_runs

ROUNDHOUSE = str(Path(sys.executable).with_name("roundhouse"))
JOB = {
    "name": "runs",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 32},
    "trainer": {"max_steps": 20, "log_every_steps": 5, "eval_every_steps": 10},
    "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
}


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four runs: two finished (lr 0.1 and 0.01), one failed (NaN loss), one killed."""
    root = tmp_path_factory.mktemp("storage")
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "storage": {"path": str(root / "runs")}}))
    for run_id, lr in (("a-fast", 0.1), ("b-slow", 0.01)):
        args = ["train", str(job), "--local", f"trainer.optimizer.lr={lr}"]
        assert main([*args, f"storage.run_id={run_id}", "trainer.optimizer.name=sgd"]) == 0
    args = ["train", str(job), "--local", "storage.run_id=c-nan", "trainer.optimizer.lr=1e12"]
    assert main([*args, "trainer.optimizer.name=sgd"]) == 2
    kill_mid_run(job, root / "runs" / "runs" / "d-killed")
    return root / "runs"


def kill_mid_run(job: Path, run: Path) -> None:
    proc = subprocess.Popen(
        [
            ROUNDHOUSE,
            "train",
            str(job),
            "--local",
            "storage.run_id=d-killed",
            "trainer.max_steps=100000",
            "trainer.max_epochs=100000",  # neither limit may end the run before the kill
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_list_shows_status_steps_best_metric_and_duration(
    storage: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["runs", "list", str(storage)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:6] == ["run", "job", "strategy", "workers", "status", "steps"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"a-fast", "b-slow", "c-nan", "d-killed"}
    assert [rows[r][4] for r in ("a-fast", "b-slow", "c-nan", "d-killed")] == [
        "finished",
        "finished",
        "failed",
        "killed",
    ]
    assert rows["a-fast"][5] == "20" and rows["a-fast"][1:4] == ["runs", "single", "1"]
    records = {r.run_id: r for r in list_runs(str(storage))}
    best = records["a-fast"].best("val/accuracy")
    assert rows["a-fast"][6:8] == ["val/accuracy", f"{best:.4g}"]
    assert best == max(records["a-fast"].series("val/accuracy"), key=lambda p: p[2])[2]
    assert ":" in rows["a-fast"][8]  # m:ss


def test_list_filters_by_job_name(storage: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "list", str(storage), "--name", "other"]) == 0
    assert capsys.readouterr().out.strip() == "no runs"


def test_compare_shows_differing_keys_and_metrics_side_by_side(
    storage: Path, capsys: pytest.CaptureFixture
) -> None:
    runs = [str(storage / "runs" / "a-fast"), "b-slow"]  # a folder, and an id under --storage
    assert main(["runs", "compare", *runs, "--storage", str(storage)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = {
        line.split()[0]
        if line.split()[0] not in ("final", "best")
        else " ".join(line.split()[:2]): line.split()[-2:]
        for line in lines[1:]
    }
    assert table["trainer.optimizer.lr"] == ["0.1", "0.01"]
    assert "storage.run_id" not in table and "model.name" not in table  # equal keys left out
    final = [
        json.loads(r)
        for r in (storage / "runs" / "a-fast" / "metrics.jsonl").read_text().splitlines()
        if "val/accuracy" in r
    ][-1]["val/accuracy"]
    assert table["final val/accuracy"][0] == f"{final:.4g}"
    assert "best val/loss" in table and "final test/accuracy" in table


def test_plot_writes_a_png_with_curves(storage: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "curves.png"
    args = ["runs", "plot", "a-fast", "b-slow", "--storage", str(storage)]
    assert main([*args, "--metrics", "train/loss,val/accuracy", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    pixels = matplotlib.image.imread(out)[..., :3]
    assert pixels.shape[1] > pixels.shape[0] > 300  # two panels side by side
    colored = np.abs(pixels - pixels.mean(axis=2, keepdims=True)).sum(axis=2) > 0.2
    assert colored.sum() > 500  # line colors, not just black axes on white
    time_out = tmp_path / "time.png"
    assert main([*args, "--metrics", "val/loss", "--out", str(time_out), "--x", "time"]) == 0
    assert time_out.stat().st_size > 5_000


def test_plot_of_an_unknown_metric_or_run_is_one_line(
    storage: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "x.png"
    args = ["runs", "plot", "a-fast", "--storage", str(storage), "--out", str(out)]
    assert main([*args, "--metrics", "val/bleu"]) == 2
    assert main(["runs", "compare", "a-fast", "nope", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no run logged 'val/bleu'" in err[0] and "named 'nope'" in err[1]
    assert not out.exists()
