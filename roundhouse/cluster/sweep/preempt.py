"""SIGTERM to a sweep: every trial that trains checkpoints, and `--resume` continues them.

A sweep's trials run in Tune's trial actors, each with its run driver in a thread, so no
signal reaches them. SIGTERM to the `roundhouse tune` process (`SweepPreemption`):

1. writes `PREEMPTED` in the sweep folder. Every trial looks for it at each poll of its
   metrics (`TrialPreemption.poll`). A trial whose workers train hands it on to its run
   driver (`preempt_relay.preempt_drivers`): the workers checkpoint at the next step boundary,
   as on SIGTERM to a run's driver, and the trial ends with `Preempted`. It notes
   `preempt/<trial id>` as `stopping` first and `stopped` once its driver returned. A trial
   still queued for its workers, or one that starts after the file appeared, ends at once:
   it has trained nothing since its last checkpoint;
2. waits until every trial that noted `stopping` has `stopped`, or `cluster.preempt_grace_s`
   plus `MARGIN_S` has passed, then stops Tune as Ctrl-C would (SIGUSR1, to which Tune
   answers by saving its experiment state and ending `fit()`);
3. `roundhouse tune` then ends with one line and exit 143. Tune's tracebacks of the
   preempted trials stay in each trial's error file, off the console; what Ray Train's
   controllers log about the trial groups that the preemption ended goes to Ray's console
   log file (`cluster.quiet`). `roundhouse tune JOB --resume` restarts the trials that had
   not finished, and each continues from its latest checkpoint (`tuner.prepare_trial`), bit
   for bit where the preemption wrote it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from roundhouse.cluster import quiet
from roundhouse.cluster.preempt_relay import preempt_drivers
from roundhouse.runs.rundir import RunDir
from roundhouse.runs.status import RUNNING, recorded_status
from roundhouse.trainer.preemption import Preempted

logger = logging.getLogger(__name__)

FLAG = "PREEMPTED"
NOTES = "preempt"  # preempt/<trial id>: "stopping", then "stopped"
STOPPING, STOPPED = "stopping", "stopped"
MARGIN_S = 15.0  # beyond the trials' grace: their drivers' own deadlines act first
NOTE_WAIT_S = 3.0  # every training trial polls (each `POLL_S`) and notes itself within this
POLL_S = 0.5
# Where Tune logs a trial's error and the trials that did not complete.
TUNE_LOGGERS = ("ray.tune.execution.tune_controller", "ray.tune.tune")
# The Ray actors that log a queued trial's end as their worker group's startup failure.
TRAIN_CONTROLLERS = ("TrainController",)


class SweepPreemption:
    """The sweep driver's side (module docstring), around `Tuner.fit()` on the main thread.

    Args:
        sweep_url: the sweep folder.
        grace_s: the trials' `cluster.preempt_grace_s`.
    """

    def __init__(self, sweep_url: str, grace_s: float) -> None:
        self.folder = RunDir(sweep_url)
        self.grace_s = grace_s
        self.signalled_at: float | None = None
        self.fitting = threading.Event()  # set while `fit()` runs: SIGUSR1 goes to Tune
        self.lock = threading.Lock()
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SweepPreemption:
        self.folder.remove(FLAG)  # a resumed sweep's old notice
        self.folder.remove(NOTES)
        for name in TUNE_LOGGERS:
            logging.getLogger(name).addFilter(self.expected)
        if threading.current_thread() is threading.main_thread():
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
            # Tune installs its own SIGUSR1 handler in `fit()`; until then one is ignored.
            self.previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self.fitting.set()
        return self

    def __exit__(self, *_: object) -> None:
        for name in TUNE_LOGGERS:
            logging.getLogger(name).removeFilter(self.expected)
        with self.lock:
            self.fitting.clear()
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)

    def expected(self, record: logging.LogRecord) -> bool:
        """Tune's log filter: drop what a preemption makes Tune say (each preempted trial's
        traceback, the list of trials that did not complete); the sweep says it in one line."""
        if not self.signalled:
            return True
        if record.getMessage().startswith("Trials did not complete"):
            return False
        return not (record.exc_info and isinstance(record.exc_info[1], Preempted))

    @property
    def signalled(self) -> bool:
        """Whether the sweep got SIGTERM."""
        return self.signalled_at is not None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.signalled_at is not None:
            return
        self.signalled_at = time.monotonic()
        quiet.expect_errors_from(*TRAIN_CONTROLLERS)
        logger.warning("SIGTERM: every training trial checkpoints at its next step boundary")
        threading.Thread(target=self.stop_tune, name="roundhouse-sweep-stop", daemon=True).start()

    def stop_tune(self) -> None:
        """Tell the trials, wait for those that train to stop, then end Tune's `fit()`."""
        assert self.signalled_at is not None
        self.folder.write_text(FLAG, "SIGTERM\n")
        deadline = self.signalled_at + self.grace_s + MARGIN_S
        time.sleep(NOTE_WAIT_S)
        while time.monotonic() < deadline and STOPPING in self.notes().values():
            time.sleep(POLL_S)
        stopping = [t for t, note in self.notes().items() if note == STOPPING]
        if stopping:
            logger.error("trials %s did not stop within the grace period", stopping)
        while True:  # Tune's handler may not be installed yet: repeat until `fit()` ends
            with self.lock:
                if not self.fitting.is_set():
                    return
                os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1.0)

    def notes(self) -> dict[str, str]:
        """Each noted trial's `stopping` or `stopped`."""
        found = {}
        for trial in self.folder.listdir(NOTES):
            try:
                found[trial] = self.folder.read_text(NOTES, trial).strip()
            except FileNotFoundError:
                continue
        return found

    def error(self, sweep_id: str) -> Preempted:
        """The one line that ends a preempted sweep."""
        stopped = [t for t, note in self.notes().items() if note == STOPPED]
        return Preempted(
            f"sweep {sweep_id} preempted: {len(stopped)} training trial(s) checkpointed "
            "and stopped",
            f"run the same tune command with --resume {sweep_id} to continue",
        )


class TrialPreemption:
    """A trial's side (module docstring).

    Args:
        sweep_url: the sweep folder.
        trial_id: this trial's Tune id.
        run_dir: the trial's run folder (its `status.json` says whether its workers train).
        hand_on: tells the run driver in this process (`preempt_relay.preempt_drivers`).
    """

    def __init__(
        self,
        sweep_url: str,
        trial_id: str,
        run_dir: RunDir,
        hand_on: Callable[[], None] = preempt_drivers,
    ) -> None:
        self.folder = RunDir(sweep_url)
        self.trial_id = trial_id
        self.run_dir = run_dir
        self.hand_on = hand_on
        self.handed_on = False

    def requested(self) -> bool:
        """Whether the sweep was preempted."""
        return self.folder.exists(FLAG)

    def check_before_start(self) -> None:
        """Raise `Preempted` if the sweep was preempted before this trial started."""
        if self.requested():
            raise self.error("before it started")

    def poll(self) -> bool:
        """At each poll of the trial's metrics: whether to stop waiting for the run (the
        sweep was preempted and this trial's workers were not training yet)."""
        if self.handed_on or not self.requested():
            return False
        if not self.training():
            return True
        self.folder.write_text(f"{NOTES}/{self.trial_id}", STOPPING)
        self.handed_on = True
        self.hand_on()
        return False

    def training(self) -> bool:
        """Whether this trial's workers train (rank 0 wrote `running` in the run folder)."""
        return recorded_status(self.run_dir) == RUNNING

    def stopped(self) -> None:
        """The run driver returned: note it, if the trial had handed the preemption on."""
        if self.handed_on:
            self.folder.write_text(f"{NOTES}/{self.trial_id}", STOPPED)

    def error(self, when: str) -> Preempted:
        """A trial's end on the sweep's preemption (Tune records it as errored, and
        `--resume` restarts it)."""
        return Preempted(
            f"trial {self.trial_id}: the sweep was preempted {when}",
            "continue the sweep: the same tune command with --resume",
        )
