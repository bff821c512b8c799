"""`roundhouse tune` on a real Ray cluster: a 3-trial sweep whose driver is killed and resumed,
and a preempted (SIGTERM) sweep resumed.

One module-scoped `ray start` cluster (3 CPUs: two 1-worker trials at a time, the third
queues); the sweeps run as `roundhouse tune ... --address` subprocesses, as a user runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.helpers.ray_cluster import RayCluster, start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
SWEEP_TIMEOUT_S = 300
JOB = {
    "name": "sweep",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 64},
    "trainer": {
        "max_epochs": 3,
        "log_every_steps": 5,
        "optimizer": {"name": "adam", "lr": 0.003},
        "checkpoint": {"every_epoch": True, "keep_last": 1},
    },
    "strategy": {"kind": "ring"},
    "cluster": {"num_workers": 1, "cpus_per_worker": 1},
    "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
}
SEARCH = ["--search", "trainer.optimizer.lr=choice(0.0003,0.003,0.03)"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    cluster = start_cluster(head_cpus=3, extra_nodes=())
    try:
        yield cluster
    finally:
        cluster.stop()


def write_job(folder: Path, **changes: object) -> Path:
    job = {**JOB, **changes, "storage": {"path": str(folder / "runs")}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def start_tune(cluster: RayCluster, job: Path, *args: str) -> subprocess.Popen:
    # Run from the repository, whose folder Ray puts on the workers' path: the tests' models
    command = [sys.executable, "-m", "roundhouse.launch.cli", "tune", str(job), *args]
    return subprocess.Popen(
        [*command, "--address", cluster.gcs_address],
        cwd=ROOT,
        env=cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        proc.kill()
    return proc.returncode, out, err


def trial_status(sweep: Path) -> dict[str, dict]:
    """Trial id -> its status.json, for the trials that wrote one."""
    found = {}
    for status in sweep.glob("*/status.json"):
        try:
            found[status.parent.name] = json.loads(status.read_text())
        except json.JSONDecodeError:
            continue
    return found


def stop_when(proc: subprocess.Popen, ready: Callable[[], bool]) -> None:
    """Wait (while the sweep runs) until `ready()`."""
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if ready():
            return
    raise AssertionError(f"the sweep ended before the signal: {finish(proc)}")


def sweeps_of(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "runs" / "sweep").glob("tune-*"))


def test_killed_sweep_resumes_and_writes_table_best_job_and_trial_runs(cluster, tmp_path) -> None:
    """A 3-trial grid sweep, SIGKILLed once a trial finished, then `--resume`d: the finished
    trial is not rerun, the interrupted ones resume from their last epoch's checkpoint, and the
    resumed sweep prints the table of all 3 and writes the best job. Its trials run on the
    live group (trials reuse the actors of the trials before them; the preemption test below
    runs Ray Train's, the default)."""
    live = {"recovery": "live", "keep_warm_s": 10}  # gone before the next test needs the CPUs
    job = write_job(tmp_path, cluster={**JOB["cluster"], **live})
    args = [*SEARCH, "--searcher", "grid", "--scheduler", "fifo", "--metric", "val/accuracy"]
    proc = start_tune(cluster, job, *args)

    def a_trial_finished() -> bool:
        sweeps = sweeps_of(tmp_path)
        statuses = trial_status(sweeps[0]) if sweeps else {}
        return any(s["status"] == "finished" for s in statuses.values())

    stop_when(proc, a_trial_finished)
    time.sleep(4)  # Tune saves its experiment state every few seconds
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    sweep = sweeps_of(tmp_path)[0]
    done_before = {t: s for t, s in trial_status(sweep).items() if s["status"] == "finished"}

    code, out, err = finish(start_tune(cluster, job, *args, "--resume"))
    assert code == 0, err[-3000:]
    assert len(sweeps_of(tmp_path)) == 1
    statuses = trial_status(sweep)
    assert len(statuses) == 3 and {s["status"] for s in statuses.values()} == {"finished"}
    assert_resumed_not_rerun(sweep, done_before, statuses)
    lrs = set()
    for trial in statuses:
        resolved = yaml.safe_load((sweep / trial / "job.yaml").read_text())
        assert resolved["tracking"]["wandb"]["group"] == sweep.name  # W&B runs grouped by sweep
        assert resolved["storage"]["run_id"] == f"{sweep.name}/{trial}"
        lrs.add(resolved["trainer"]["optimizer"]["lr"])
    assert lrs == {0.0003, 0.003, 0.03}
    # 3 CPUs, 1-CPU trials and 1 CPU kept for the trials' drivers: 2 at a time, 1 queued
    # (as a standby: its actor runs, its worker group waits for one of the others to end)
    spans = [(s["started"], s["time"]) for s in statuses.values()]
    overlapping = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert overlapping <= 2
    table = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in statuses]
    assert len(table) == 3
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    best_line = table[0].split()  # best first
    assert str(best["trainer"]["optimizer"]["lr"]) == best_line[1]
    assert best["storage"]["run_id"] is None and best["tracking"]["wandb"]["group"] is None
    # the printed best metric is the trial's best evaluation in its own metrics.jsonl
    rows = (sweep / best_line[0] / "metrics.jsonl").read_text().splitlines()
    accuracies = [json.loads(r)["val/accuracy"] for r in rows if "val/accuracy" in r]
    assert float(best_line[4]) == pytest.approx(max(accuracies), abs=1e-3)
    # Ray's own notices, and Ray Tune's experiment box and status tables, stay off the console
    assert "PreemptionWatcher" not in out + err and "Token authentication" not in out + err
    assert "Configuration for experiment" not in out + err and "Trial status" not in out + err


def assert_resumed_not_rerun(sweep: Path, done_before: dict, after: dict) -> None:
    """Trials finished before the stop keep their status file; the others resumed from a
    checkpoint (no step logged twice)."""
    for trial, status in done_before.items():
        assert after[trial]["started"] == status["started"]
    for trial in set(after) - set(done_before):
        rows = [json.loads(r) for r in (sweep / trial / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if "train/loss" in r]
        assert steps == sorted(set(steps)), "a step was logged twice: the trial restarted"


def test_preempted_sweep_checkpoints_its_training_trials_and_resumes(cluster, tmp_path) -> None:
    """SIGTERM while a trial trains (steps of at least 0.1 s): each trial that trains
    checkpoints where it is first, and the sweep exits 143; `--resume` finishes them."""
    slow = {"name": "tests.helpers.models:slow_mlp", "options": {"delay_s": 0.1}}
    # 2 trials of 2 epochs: both train at once, and the resumed sweep is short
    job = write_job(tmp_path, model=slow, trainer={**JOB["trainer"], "max_epochs": 2})
    search = ["--search", "trainer.optimizer.lr=choice(0.003,0.03)"]
    args = [*search, "--searcher", "grid", "--scheduler", "fifo", "--metric", "val/accuracy"]
    proc = start_tune(cluster, job, *args)

    def a_trial_logged_step_10() -> bool:
        sweeps = sweeps_of(tmp_path)
        return bool(sweeps) and any(
            '"step": 10,' in m.read_text() for m in sweeps[0].glob("*/metrics.jsonl")
        )

    stop_when(proc, a_trial_logged_step_10)
    os.kill(proc.pid, signal.SIGTERM)
    code, _, err = finish(proc)
    sweep = sweeps_of(tmp_path)[0]
    assert code == 143, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "preempted" in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # no preempted trial's traceback
    notes = {p.name: p.read_text() for p in (sweep / "preempt").iterdir()}
    assert notes and set(notes.values()) == {"stopped"}, notes
    assert f"{len(notes)} training trial(s) checkpointed" in lines[0]
    for trial in notes:  # checkpointed at the step it stopped: after every logged step
        rows = (sweep / trial / "metrics.jsonl").read_text().splitlines()
        logged = max(json.loads(r)["step"] for r in rows)
        latest = (sweep / trial / "checkpoints" / "latest").read_text().strip()
        assert int(latest.removeprefix("step_")) >= logged
    done_before = {t: s for t, s in trial_status(sweep).items() if s["status"] == "finished"}

    code, _, err = finish(start_tune(cluster, job, *args, "--resume"))
    assert code == 0, err[-3000:]
    after = trial_status(sweep)
    assert len(after) == 2 and {s["status"] for s in after.values()} == {"finished"}
    assert_resumed_not_rerun(sweep, done_before, after)
