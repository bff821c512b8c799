"""The sweep preemption's protocol in the sweep folder (`cluster/sweep/preempt.py`): what a
trial does at each poll once the sweep got SIGTERM, and what the sweep driver reads back.
The whole path on a real Ray cluster: tests/integration/test_tune.py."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path

import pytest

from roundhouse.cluster.sweep.preempt import (
    FLAG,
    STOPPED,
    STOPPING,
    SweepPreemption,
    TrialPreemption,
)
from roundhouse.runs.rundir import RunDir
from roundhouse.trainer.preemption import Preempted


def trial(sweep: Path, name: str, status: str | None) -> tuple[TrialPreemption, list[int]]:
    """A trial of the sweep folder `sweep` whose run folder says `status` (None: none yet)."""
    run = sweep / name
    run.mkdir(parents=True)
    if status is not None:
        (run / "status.json").write_text(json.dumps({"status": status}))
    calls: list[int] = []
    return TrialPreemption(str(sweep), name, RunDir(str(run)), lambda: calls.append(1)), calls


def test_a_training_trial_hands_the_preemption_on_once_and_notes_its_stop(tmp_path) -> None:
    preemption, calls = trial(tmp_path, "t1", "running")
    preemption.check_before_start()
    assert not preemption.poll() and calls == []  # no SIGTERM yet
    (tmp_path / FLAG).write_text("SIGTERM\n")
    assert not preemption.poll()  # it trains: it waits for its workers' checkpoint
    assert calls == [1] and (tmp_path / "preempt" / "t1").read_text() == STOPPING
    assert not preemption.poll() and calls == [1]  # told once
    preemption.stopped()
    assert (tmp_path / "preempt" / "t1").read_text() == STOPPED


def test_a_trial_not_yet_training_stops_waiting_and_a_new_one_does_not_start(tmp_path) -> None:
    queued, calls = trial(tmp_path, "t1", None)
    (tmp_path / FLAG).write_text("SIGTERM\n")
    assert queued.poll() and calls == []  # nothing trained since its last checkpoint
    queued.stopped()
    assert not (tmp_path / "preempt").exists()  # the sweep waits only for training ones
    late, _ = trial(tmp_path, "t2", None)
    with pytest.raises(Preempted, match="t2: the sweep was preempted before it started"):
        late.check_before_start()


def test_the_sweep_clears_an_old_notice_counts_the_stopped_and_quiets_tune(tmp_path) -> None:
    (tmp_path / FLAG).write_text("SIGTERM\n")  # left by the preempted run of this sweep
    (tmp_path / "preempt").mkdir()
    (tmp_path / "preempt" / "old").write_text(STOPPED)
    tune_log = logging.getLogger("ray.tune.tune")
    with SweepPreemption(str(tmp_path), grace_s=5.0) as sweep:
        assert not (tmp_path / FLAG).exists() and sweep.notes() == {}
        if threading.current_thread() is threading.main_thread():
            assert signal.getsignal(signal.SIGTERM) == sweep._on_sigterm
        record = tune_log.makeRecord(
            "ray.tune.tune", logging.ERROR, "", 0, "Trials did not complete: [a]", (), None
        )
        assert sweep.expected(record)  # before a SIGTERM Tune says what it says
        sweep.signalled_at = 1.0
        assert not sweep.expected(record)
        error = Preempted("preempted at step 3")
        record.exc_info = (Preempted, error, None)
        record.msg = "Trial task failed for trial t1"
        assert not sweep.expected(record)
        record.exc_info = (ValueError, ValueError("bad"), None)  # a real failure still shows
        assert sweep.expected(record)
        for name, note in (("t1", STOPPED), ("t2", STOPPED), ("t3", STOPPING)):
            RunDir(str(tmp_path)).write_text(f"preempt/{name}", note)
        assert "tune-x preempted: 2 training trial(s) checkpointed" in str(sweep.error("tune-x"))
    assert signal.getsignal(signal.SIGTERM) != sweep._on_sigterm
