"""The driver's view of a run on Ray: progress and restarts, read from the run folder.

Workers never call Ray to report progress (`ray.train.report` costs ~1.3 s per call). Rank 0
already appends a line to `metrics.jsonl` every `trainer.log_every_steps`, and every rank writes
`ranks/rank_<r>.json` when it starts. `RunMonitor` polls those two files from a thread on the
driver while `TorchTrainer.fit()` runs: training rows move the console progress (a rich bar on a
terminal, plain lines otherwise: the same console as `--local`), evaluation rows print one line,
and a new rank-0 record after the first one means Ray restarted the worker group.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from roundhouse.cluster.topology import read_rank_record
from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology, compute_total_steps
from roundhouse.data import build_splits
from roundhouse.runs.console import Progress, build_progress, format_metrics
from roundhouse.runs.metrics_file import METRICS_FILE
from roundhouse.runs.rundir import RunDir

logger = logging.getLogger(__name__)

LOCAL_POLL_S = 1.0
REMOTE_POLL_S = 15.0  # remote metrics.jsonl is uploaded at most once a minute anyway


class MetricsTail:
    """New complete lines of `metrics.jsonl` since the last call.

    Locally the file is read from the last offset; a file that got shorter (rows dropped on
    resume) is read again from the start. Remotely the whole file is fetched and rows already
    seen are skipped by count.
    """

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.offset = 0
        self.rows_seen = 0

    def read_new(self) -> list[dict[str, Any]]:
        """The `metrics.jsonl` rows written since the last call (none while the file is absent)."""
        local = self.run_dir.local_path()
        if local is not None:
            return self._read_local(f"{local}/{METRICS_FILE}")
        if not self.run_dir.exists(METRICS_FILE):
            return []
        rows = parse_rows(self.run_dir.read_bytes(METRICS_FILE))
        if len(rows) < self.rows_seen:
            self.rows_seen = 0
        new, self.rows_seen = rows[self.rows_seen :], len(rows)
        return new

    def _read_local(self, path: str) -> list[dict[str, Any]]:
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                if f.tell() < self.offset:
                    self.offset = 0  # rewritten shorter on resume
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line being written waits for next time
        self.offset += len(complete)
        return parse_rows(complete)


def parse_rows(data: bytes) -> list[dict[str, Any]]:
    """JSON objects of the complete lines in `data` (a torn line is skipped)."""
    rows = []
    for line in data.decode(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class RunMonitor:
    """Polls the run folder from a daemon thread; use as a context manager around `fit()`.

    Args:
        job: the resolved job (`tracking.console`, `trainer.max_steps`, `cluster.max_failures`).
        run_dir: the run folder the workers write to.
        started: wall-clock time the job was launched; rank-0 records older than this belong
            to an earlier invocation (`--resume`) and are ignored.
        poll_s: seconds between polls (default: 1 locally, 15 on remote storage).
    """

    def __init__(
        self, job: JobSpec, run_dir: RunDir, started: float, poll_s: float | None = None
    ) -> None:
        self.job, self.run_dir, self.started = job, run_dir, started
        self.poll_s = poll_s or (LOCAL_POLL_S if run_dir.is_local else REMOTE_POLL_S)
        self.tail = MetricsTail(run_dir)
        self._progress: Progress | None = None
        self.attempts: list[tuple[int, float]] = []  # (pid, started) of each rank-0 start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="roundhouse-monitor", daemon=True)

    @property
    def restarts(self) -> int:
        """How many times the worker group was restarted (seen so far)."""
        return max(0, len(self.attempts) - 1)

    def __enter__(self) -> RunMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        try:
            self.poll()  # what was written since the last poll
        except Exception:  # never mask the run's own outcome
            logger.debug("run monitor poll failed", exc_info=True)
        if self._progress is not None:
            self._progress.close()

    @property
    def progress(self) -> Progress:
        """The console, built on first use (its total may need the data's size)."""
        if self._progress is None:
            console = self.job.tracking.console
            # No console (a sweep's trial): no total to show, so no data to load for it.
            total = None if console == "off" else estimate_total_steps(self.job)
            self._progress = build_progress(console, total)
        return self._progress

    def _run(self) -> None:
        _ = self.progress  # load the split's size now, while the workers start
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # the monitor must never take the run down
                logger.debug("run monitor poll failed", exc_info=True)

    def poll(self) -> None:
        """Check for a new worker-group attempt, then show new metric rows."""
        self._check_attempt()
        for row in self.tail.read_new():
            self._show(row)

    def _check_attempt(self) -> None:
        record = read_rank_record(self.run_dir, 0)
        if record is None or record.get("started", 0) < self.started:
            return
        key = (record.get("pid", 0), record.get("started", 0.0))
        if key in self.attempts:
            return
        self.attempts.append(key)
        if len(self.attempts) > 1:
            logger.warning(
                "worker group restarted (restart %d, cluster.max_failures=%d): %d worker(s), "
                "resuming from checkpoint step %s",
                self.restarts,
                self.job.cluster.max_failures,
                record.get("world_size", 0),
                record.get("resume_step"),
            )

    def _show(self, row: dict[str, Any]) -> None:
        step, epoch = int(row.get("step", 0)), int(row.get("epoch", 0))
        if "train/loss" in row:
            self.progress.update(
                step=step,
                epoch=epoch,
                loss=row.get("train/loss"),
                samples_per_s=row.get("train/samples_per_s"),
            )
        shown = {k: v for k, v in row.items() if k.startswith(("val/", "test/"))}
        if shown:
            self.progress.message(f"epoch {epoch} | step {step} | {format_metrics(shown)}")


def estimate_total_steps(job: JobSpec) -> int | None:
    """The run's length in optimizer steps, by the loader's arithmetic (None if unknown).

    With `max_epochs` the length depends on the training split's size, so the driver loads the
    data source's split once (in the monitor thread, not on the job's critical path). The
    remainder rule is the job's `Topology` at `cluster.num_workers` workers.
    """

    if job.trainer.max_epochs is None:
        return job.trainer.max_steps
    try:
        info = build_splits(job.data, seed=job.trainer.seed).info
        topology = Topology.of_job(job, job.cluster.num_workers)
        return compute_total_steps(job, topology.steps_per_epoch(info.num_samples["train"]))
    except Exception:  # only the bar's total depends on it
        logger.debug("cannot estimate the number of steps", exc_info=True)
        return job.trainer.max_steps
