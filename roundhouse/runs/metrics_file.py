"""`metrics.jsonl`: one JSON object per line, appended by rank 0 (see `MetricsFile`)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from roundhouse.runs.rundir import RunDir

METRICS_FILE = "metrics.jsonl"
# On remote storage the whole file is uploaded at most this often while training runs.
REMOTE_UPLOAD_INTERVAL_S = 60.0


class MetricsFile:
    """`metrics.jsonl`, opened once in append mode; one JSON object per line.

    On local storage the run folder's file is appended to directly (flushed per line, never
    fsync'ed: a crash loses at most the lines the OS had not written). On remote storage a local
    copy (seeded with the remote file on resume) is appended to and uploaded whole by `flush`,
    `close` and, at most every `REMOTE_UPLOAD_INTERVAL_S`, by `append`.
    """

    def __init__(self, run_dir: RunDir, resume_step: int | None = None) -> None:
        self.run_dir = run_dir
        local = run_dir.local_path()
        if local is not None:
            os.makedirs(local, exist_ok=True)
            self.path = Path(local) / METRICS_FILE
        else:
            self.path = Path(tempfile.mkdtemp(prefix="roundhouse-metrics-")) / METRICS_FILE
            if run_dir.exists(METRICS_FILE):
                self.path.write_bytes(run_dir.read_bytes(METRICS_FILE))
        if resume_step is not None:
            self._drop_rows_after(resume_step)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._end_partial_line()
        self._last_upload = time.monotonic()

    def _end_partial_line(self) -> None:
        """A crash mid-write can leave a last line without newline; never glue onto it."""
        size = self.path.stat().st_size
        if size and self.path.read_bytes()[-1:] != b"\n":
            self._file.write("\n")

    def _drop_rows_after(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint: the resumed run logs them again."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if row.get("step", 0) <= step:
                kept.append(line + "\n")
        self.path.write_text("".join(kept), encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        """Write one line and hand it to the OS."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        due = time.monotonic() - self._last_upload >= REMOTE_UPLOAD_INTERVAL_S
        if due and not self.run_dir.is_local:
            self.flush()

    def flush(self) -> None:
        """Flush the file; on remote storage upload the whole file (atomic PUT)."""
        if self._file.closed:
            return
        self._file.flush()
        if not self.run_dir.is_local:
            self.run_dir.write_bytes(METRICS_FILE, self.path.read_bytes())
            self._last_upload = time.monotonic()

    def close(self) -> None:
        """Flush (and upload) for the last time."""
        self.flush()
        self._file.close()


def read_final_metrics(run_dir: RunDir) -> dict[str, float]:
    """The metrics of the last logged step (its val/test rows merged), from metrics.jsonl."""
    if not run_dir.exists(METRICS_FILE):
        return {}
    rows = []
    for line in run_dir.read_text(METRICS_FILE).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    if not rows:
        return {}
    last = max(row.get("step", 0) for row in rows)
    merged: dict[str, float] = {}
    for row in rows:
        if row.get("step") == last:
            merged.update({k: v for k, v in row.items() if "/" in k})
    return merged
