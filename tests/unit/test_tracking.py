"""Tracker: metrics.jsonl, offline W&B read back from its `.wandb` file, console, secrets."""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from roundhouse.config import JobSpec
from roundhouse.runs.console import PlainProgress
from roundhouse.runs.metrics_file import METRICS_FILE
from roundhouse.runs.rundir import RunDir
from roundhouse.runs.tracking import (
    WANDB_ID_FILE,
    Tracker,
    redact_secrets,
    resolve_wandb_mode,
    wandb_log_finished,
)
from tests.helpers.wandb_reader import (
    find_wandb_file,
    find_wandb_files,
    read_config,
    read_exit_code,
    read_history,
    read_records,
    read_run,
    read_summary,
)

SECRET = "s3cr3t-value-never-in-files-7731"


@pytest.fixture(autouse=True)
def _quiet_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)


def make_job(wandb_mode: str = "auto", console: str = "off", **extra: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "t",
            "model": {"name": "mlp"},
            "tracking": {"wandb": {"mode": wandb_mode}, "console": console},
            **extra,
        }
    )


def read_jsonl(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def log_steps(tracker: Tracker, steps: range, epoch: int = 0) -> dict[int, float]:
    losses = {}
    for step in steps:
        losses[step] = 1.0 / step
        tracker.log({"train/loss": losses[step], "train/lr": 0.1}, step=step, epoch=epoch)
        tracker.update_progress(step=step, epoch=epoch, loss=losses[step], samples_per_s=100.0)
    return losses


def test_logs_jsonl_and_offline_wandb_with_secrets_redacted(tmp_path: Path) -> None:
    job = make_job(
        cluster={"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": SECRET, "OMP": "1"}}}
    )
    run = tmp_path / "t" / "run1"
    with Tracker(
        job, RunDir(str(run)), is_main=True, extra_config={"model/num_params": 1234}
    ) as tr:
        losses = log_steps(tr, range(1, 6))
        tr.log({"val/loss": torch.tensor(0.5), "val/accuracy": 0.75}, step=5, epoch=0)
        tr.summary({"test/accuracy": 0.8})

    rows = read_jsonl(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 5]
    assert {"step", "epoch", "time", "train/loss", "train/lr"} <= rows[0].keys()
    assert rows[-1]["val/accuracy"] == 0.75 and rows[0]["time"] > 1e9

    wandb_file = find_wandb_file(run)
    history = [h for h in read_history(wandb_file) if "train/loss" in h]
    assert {h["_step"]: h["train/loss"] for h in history} == losses
    assert history[-1]["val/loss"] == 0.5 and history[-1]["epoch"] == 0  # merged at step 5
    config = read_config(wandb_file)
    assert config["model"]["name"] == "mlp" and config["model/num_params"] == 1234
    assert config["cluster"]["runtime_env"]["env_vars"] == {
        "AWS_SECRET_ACCESS_KEY": "***",
        "OMP": "1",
    }
    summary = read_summary(wandb_file)
    assert summary["model/num_params"] == 1234 and summary["test/accuracy"] == 0.8
    assert read_exit_code(wandb_file) == 0
    assert read_run(wandb_file).display_name == "t-run1"
    assert wandb_log_finished(wandb_file)
    assert SECRET.encode() not in all_bytes(run)


def test_env_secret_values_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    job = make_job("offline", cluster={"runtime_env": {"env_vars": {"MY_VAR": SECRET}}})
    with Tracker(job, RunDir(str(tmp_path)), is_main=True) as tracker:
        log_steps(tracker, range(1, 3))
    config = read_config(find_wandb_file(tmp_path))
    assert config["cluster"]["runtime_env"]["env_vars"]["MY_VAR"] == "***"
    assert SECRET.encode() not in all_bytes(tmp_path)


def test_wandb_log_finished_needs_the_exit_record(tmp_path: Path) -> None:
    header_only = tmp_path / "run-x.wandb"
    header_only.write_bytes(b":W&B\xe1\xbe\x00")
    assert not wandb_log_finished(header_only)
    assert not wandb_log_finished(tmp_path / "missing.wandb")


def test_online_start_failure_falls_back_to_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as sock:  # a loopback port nobody listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    with Tracker(make_job(), RunDir(str(tmp_path)), is_main=True) as tracker:
        log_steps(tracker, range(1, 3))
    assert "logging offline" in caplog.text
    history = read_history(find_wandb_file(tmp_path))
    assert [h["train/loss"] for h in history if "train/loss" in h] == [1.0, 0.5]
    assert SECRET.encode() not in all_bytes(tmp_path)  # nor in the failed online run's logs


def test_non_main_rank_writes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    tracker = Tracker(make_job(console="plain"), RunDir(str(run)), is_main=False)
    log_steps(tracker, range(1, 4))
    tracker.summary({"test/accuracy": 1.0})
    tracker.flush()
    tracker.close(failed=True)
    assert not run.exists()
    assert tracker.wandb_run_id is None


def test_disabled_wandb_writes_jsonl_only(tmp_path: Path) -> None:
    with Tracker(make_job("disabled"), RunDir(str(tmp_path)), is_main=True) as tracker:
        log_steps(tracker, range(1, 4))
        tracker.summary({"test/accuracy": 1.0})
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / WANDB_ID_FILE).exists()


def test_resume_appends_and_reuses_wandb_run(tmp_path: Path) -> None:
    job = make_job()
    with Tracker(job, RunDir(str(tmp_path)), is_main=True) as first:
        log_steps(first, range(1, 4))
        run_id = first.wandb_run_id
    with Tracker(job, RunDir(str(tmp_path)), is_main=True, resumed=True) as second:
        log_steps(second, range(4, 7), epoch=1)
        assert second.wandb_run_id == run_id

    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    files = find_wandb_files(tmp_path)
    assert len(files) == 2 and all(read_run(f).run_id == run_id for f in files)
    steps = [h["_step"] for f in files for h in read_history(f) if "train/loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_after_torn_last_line(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text('{"step": 1, "epoch": 0}\n{"step": 2, "ep')
    with Tracker(make_job("disabled"), RunDir(str(tmp_path)), is_main=True, resumed=True) as tr:
        tr.log({"train/loss": np.float32(0.5), "train/lr": torch.tensor(0.25)}, step=2, epoch=0)
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["train/lr"] == 0.25


def test_resume_drops_rows_logged_after_the_checkpoint(tmp_path: Path) -> None:
    """A run killed at step 5 and resumed from its step-3 checkpoint logs 4 and 5 again."""
    job = make_job("disabled")
    with Tracker(job, RunDir(str(tmp_path)), is_main=True) as first:
        log_steps(first, range(1, 6))
    with Tracker(job, RunDir(str(tmp_path)), is_main=True, resumed=True, resume_step=3) as again:
        log_steps(again, range(4, 7))
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_failure_marks_wandb_exit_code_and_close_is_idempotent(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        Tracker(make_job(), RunDir(str(tmp_path)), is_main=True) as tr,
    ):
        log_steps(tr, range(1, 3))
        raise RuntimeError("boom")
    tr.close()  # a second close does nothing
    tr.log({"train/loss": 1.0}, step=9, epoch=0)  # after close: ignored
    assert read_exit_code(find_wandb_file(tmp_path)) == 1
    assert [r["step"] for r in read_jsonl(tmp_path)] == [1, 2]


def test_a_preempted_run_is_marked_preempting_with_exit_code_143(tmp_path: Path) -> None:
    """SIGTERM after a complete checkpoint: W&B shows the run as preempted, not failed."""
    tracker = Tracker(make_job(), RunDir(str(tmp_path)), is_main=True)
    log_steps(tracker, range(1, 3))
    tracker.close(failed=True, preempted=True)
    records = [r.WhichOneof("record_type") for r in read_records(find_wandb_file(tmp_path))]
    assert "preempting" in records and records.index("preempting") < records.index("exit")
    assert read_exit_code(find_wandb_file(tmp_path)) == 143


def test_remote_run_folder_uploads_metrics_and_offline_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # staging copies land in tmp_path
    run_dir = RunDir(f"memory://tracking-test/{uuid.uuid4().hex}/t/run1")
    tracker = Tracker(make_job(), run_dir, is_main=True)
    log_steps(tracker, range(1, 4))
    tracker.flush()
    assert [json.loads(x)["step"] for x in run_dir.read_text(METRICS_FILE).splitlines()] == [
        1,
        2,
        3,
    ]
    tracker.close()

    offline = [n for n in run_dir.listdir("wandb") if n.startswith("offline-run-")]
    assert len(offline) == 1
    name = next(n for n in run_dir.listdir("wandb", offline[0]) if n.endswith(".wandb"))
    local_copy = tmp_path / "copy.wandb"
    local_copy.write_bytes(run_dir.read_bytes("wandb", offline[0], name))
    assert [h["train/loss"] for h in read_history(local_copy) if "train/loss" in h] == [
        1,
        0.5,
        1 / 3,
    ]
    run_dir.remove()


def test_plain_console_lines(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO, logger="roundhouse")
    job = make_job("disabled", console="plain")
    with Tracker(job, RunDir(str(tmp_path)), is_main=True, total_steps=5) as tracker:
        log_steps(tracker, range(1, 6))  # throttled: the first and the last step print
        tracker.log({"val/accuracy": 0.875, "train/loss": 0.1}, step=5, epoch=0)
    messages = [r.getMessage() for r in caplog.records]
    progress = [m for m in messages if "samples/s" in m]
    assert len(progress) == 2 and progress[0].startswith("epoch 0 | step 1/5 | loss 1")
    assert "eta 0:00:00" in progress[1]
    assert any("val/accuracy 0.875" in m and "train/loss" not in m for m in messages)


def test_plain_progress_eta() -> None:
    progress = PlainProgress(total_steps=100, interval_s=0.0)
    progress._first = (0.0, 0)
    assert "eta 0:01:30" in progress._line(10.0, 10, 0, None, None)  # 1 s/step, 90 left


def test_rich_console_runs_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Tracker(make_job("disabled", console="rich"), RunDir(str(tmp_path)), is_main=True) as tr:
        log_steps(tr, range(1, 4))
        tr.log({"test/accuracy": 0.5}, step=3, epoch=0)
    assert "test/accuracy 0.5" in capsys.readouterr().out


def test_wandb_mode_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"


def test_redact_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA1234567890")
    original = {
        "api_key": "x",
        "nested": [{"Password": "p", "HF_TOKEN": "t", "max_tokens": 5, "tokenizer": "bpe"}],
        "storage_options": {"key": "k", "secret": "s", "endpoint": "http://h"},
        "env": ("AKIA1234567890", "url://AKIA1234567890@host", 3),
        "Credentials": {"a": 1},
    }
    redacted = redact_secrets(original)
    assert redacted == {
        "api_key": "***",
        "nested": [{"Password": "***", "HF_TOKEN": "***", "max_tokens": 5, "tokenizer": "bpe"}],
        "storage_options": {"key": "***", "secret": "***", "endpoint": "http://h"},
        "env": ("***", "url://***@host", 3),
        "Credentials": "***",
    }
    assert original["api_key"] == "x" and original["nested"][0]["Password"] == "p"
