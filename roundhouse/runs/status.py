"""`status.json` in a run folder: whether the run is running, finished or failed.

Rank 0 writes `running` when training starts and `finished`, `failed` or `preempted` (stopped
by SIGTERM after a complete checkpoint: `--resume latest` continues it) when it ends. A run
whose process died without saying so (killed, machine lost, a sweep's early stop) keeps
`running`; readers call it `killed` when its process is gone (see `effective_status`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from typing import Any, Protocol

STATUS_FILE = "status.json"
RUNNING, FINISHED, FAILED, KILLED = "running", "finished", "failed", "killed"
UNKNOWN = "unknown"
STOPPED = "stopped"  # ended early by a sweep's scheduler (written by the sweep driver)
PREEMPTED = "preempted"  # SIGTERM: a complete checkpoint, then the run stopped
EXIT_PREEMPTED = 128 + signal.SIGTERM  # the exit code of a preempted run (and W&B's)


class Writable(Protocol):
    """What `write_status` needs of a run folder (a `RunDir`)."""

    def write_text(self, name: str, text: str) -> None:
        """Write `text` to the file `name` in the run folder."""


def write_status(run_dir: Writable, status: str, **extra: Any) -> None:
    """Record `status` (with this host, pid and the time) in the run folder's `status.json`."""
    record = {
        "status": status,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.time(),
        **extra,
    }
    run_dir.write_text(STATUS_FILE, json.dumps(record) + "\n")


def recorded_status(run_dir: Any) -> str | None:
    """The status `status.json` of the run folder `run_dir` (a `RunDir`) records, as written
    (no `killed` inferred); None without a readable one."""
    try:
        return json.loads(run_dir.read_text(STATUS_FILE)).get("status")
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def effective_status(record: dict[str, Any] | None) -> str:
    """`running` turned into `killed` when the writer was on this host and is gone.

    A record from another host that says `running` is believed. No record at all (a run
    starting up, one from before status files, or one that died before training started)
    reads as `unknown`.
    """
    if not record:
        return UNKNOWN
    status = str(record.get("status", KILLED))
    if status != RUNNING:
        return status
    if record.get("host") == socket.gethostname() and not pid_alive(int(record.get("pid", 0))):
        return KILLED
    return RUNNING


class RunStatus:
    """The status of one run as its main process sees it: `running` now, then how it ended.

    On other ranks (`enabled=False`) nothing is written.
    """

    def __init__(self, run_dir: Writable, *, enabled: bool, **extra: Any) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.extra = {"started": time.time(), **extra}
        if enabled:
            write_status(run_dir, RUNNING, **self.extra)

    def end(self, error: BaseException | None = None, *, preempted: bool = False) -> None:
        """`finished` without `error`; `killed` on Ctrl-C; `preempted` when `error` is the
        stop after a preemption's checkpoint; `failed` otherwise."""
        if not self.enabled:
            return
        status = FINISHED if error is None else FAILED
        if isinstance(error, KeyboardInterrupt):
            status = KILLED
        elif error is not None and preempted:
            status = PREEMPTED
        write_status(self.run_dir, status, **self.extra)
