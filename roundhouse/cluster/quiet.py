"""A quieter console under Ray: roundhouse's own lines, plus what a user can act on.

Ray forwards every line its workers print to the driver's console, with its own notices
mixed in (a controller's resource requests, a `core_worker.cc` error line about an actor's
constructor arguments, the token-authentication notice). By default those lines go to
`<Ray session>/logs/roundhouse-console.log` instead, and only warnings and errors (and
tracebacks) from the workers reach the console; `--verbose` shows everything as Ray does.

Only this module touches Ray's private log dispatcher; if Ray changes it, everything is shown
again (nothing is ever lost).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

LOG_NAME = "roundhouse-console.log"
# Driver-side Ray loggers whose notices are not actionable (the token-auth notice).
NOTICE_LOGGERS = ("ray._private.authentication",)
# A worker line is shown when it says it is a warning or an error ...
ACTIONABLE = re.compile(
    r"^(WARNING|ERROR|CRITICAL)\b|\bTraceback\b|\b\w*(Error|Exception)\b|^\[[^\]]* [EF] \d+ \d+\]"
)
# ... unless it is one of Ray's own notices about itself.
NOISE = re.compile(
    r"PreemptionWatcher|constructor arguments in the object store"
    r"|Failed to send resource request"  # Ray Train under CPU load: "safe to ignore"
)
# Lines that continue the record before them (a traceback's body and last line).
CONTINUATION = re.compile(r"^(\s|Traceback\b|[\w.]+(Error|Exception)\b)")
# Worker-side format: the level first, so that the driver can tell warnings from chatter.
WORKER_FORMAT = "%(levelname)s %(name)s: %(message)s"

_state: dict[str, Any] = {"verbose": False, "held": [], "path": None, "expected": set()}
_lock = threading.Lock()


class _HoldNotices(logging.Handler):
    """Keeps Ray's driver notices until the session's log file is known."""

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.levelname} {record.name}: {record.getMessage()}"
        if _state["path"] is None:
            _state["held"].append(line)
        else:
            write_hidden([line])


def set_verbose(verbose: bool) -> None:
    """Choose before Ray starts: everything on the console (`verbose`) or the quiet console."""
    _state["verbose"] = verbose
    for name in NOTICE_LOGGERS:
        noisy = logging.getLogger(name)
        noisy.handlers = [h for h in noisy.handlers if not isinstance(h, _HoldNotices)]
        noisy.propagate = verbose
        if not verbose:
            noisy.addHandler(_HoldNotices())


def is_shown(line: str) -> bool:
    """Whether a worker's line belongs on the quiet console."""
    return bool(ACTIONABLE.search(line)) and not NOISE.search(line)


def shown_lines(lines: list[str]) -> list[str]:
    """The lines of a batch to show: `is_shown` ones, except tracebacks that follow a noise
    line (Ray logs its own harmless retries with their tracebacks)."""
    shown, in_noise = [], False
    for line in lines:
        in_noise = bool(NOISE.search(line)) or (in_noise and bool(CONTINUATION.match(line)))
        if not in_noise and is_shown(line):
            shown.append(line)
    return shown


def expect_errors_from(*actors: str) -> None:
    """From now on, every line of these Ray actors (by class name) goes to the log file.

    For errors that roundhouse itself causes and reports in its own line: a preempted sweep
    ends the trials still waiting for their workers, and each one's Ray Train controller then
    logs its worker group's startup failure with a traceback (`cluster.sweep.preempt`).
    """
    _state["expected"].update(actors)


def write_hidden(lines: list[str]) -> None:
    """Append lines to the hidden-lines log file (when known; held until the next session's
    file is known when that file's session folder is gone)."""
    path = _state["path"]
    if path is None or not lines:
        return
    try:
        with _lock, open(path, "a", encoding="utf-8") as f:
            f.writelines(line.rstrip("\n") + "\n" for line in lines)
    except FileNotFoundError:  # the Ray session that owned the folder ended and removed it
        forget_session_log()
        _state["held"].extend(lines)


def forget_session_log() -> None:
    """The Ray session ended: hold hidden lines again until the next session's file is known."""
    _state["path"] = None


def _filtered(handler: Callable[[dict], None]) -> Callable[[dict], None]:
    def emit(data: dict) -> None:
        if data.get("pid") == "autoscaler":  # Ray shows only its events; keep that
            handler(data)
            return
        lines = data.get("lines", [])
        source = data.get("actor_name") or data.get("task_name") or ""
        shown = [] if source in _state["expected"] else shown_lines(lines)
        prefix = f"({source} pid={data.get('pid')})"
        write_hidden([f"{prefix} {line}" for line in lines if line not in shown])
        if shown:
            handler({**data, "lines": shown})

    return emit


def install_console_filter() -> str | None:
    """After `ray.init`: filter the forwarded worker lines (unless verbose); return the log
    file the hidden lines go to (None when verbose or when Ray's internals are unknown)."""
    if _state["verbose"]:
        return None
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import global_worker

        logs_dir = os.path.join(global_worker.node.get_session_dir_path(), "logs")
        with dispatcher._lock:
            dispatcher.handlers = [
                (name, _filtered(h) if name == "ray_print_logs" else h)
                for name, h in dispatcher.handlers
            ]
    except Exception:  # a Ray version whose internals differ: show everything
        logger.debug("cannot filter Ray's console output", exc_info=True)
        return None
    os.makedirs(logs_dir, exist_ok=True)
    _state["path"] = os.path.join(logs_dir, LOG_NAME)
    held, _state["held"] = _state["held"], []
    write_hidden(held)
    logger.info("Ray's own notices: %s (--verbose shows them)", _state["path"])
    return _state["path"]


def configure_worker_logging() -> None:
    """On a worker: roundhouse's log lines carry their level (see `is_shown`)."""
    root = logging.getLogger("roundhouse")
    if any(getattr(h, "_roundhouse_worker", False) for h in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    handler._roundhouse_worker = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
