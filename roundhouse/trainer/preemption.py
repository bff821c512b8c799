"""Preemption: on SIGTERM, checkpoint at the next step boundary and stop.

A SIGTERM (a spot reclaim, a scheduler's eviction, `kill`) sets a flag. The loop already
all-reduces "my loss is finite" once per step; the flag rides on that collective (a rank that
was told to stop votes false), so every rank learns of it at the same step at no extra cost,
and only then a second collective tells a non-finite loss from a preemption. The step is
applied, every rank takes part in a complete checkpoint (waiting for an async writer), and the
run stops with `Preempted`: the CLI prints one line naming the checkpoint and exits 143 (the
shell's code for SIGTERM). `--resume latest` continues bit for bit.

If no step boundary comes within `cluster.preempt_grace_s` of the signal (a step longer than
the grace period), a watchdog ends the process: checkpoints are atomic, so `latest` stays on
the previous complete one.

A loop that runs in a thread other than the main one (Ray Train's worker runs the train
function in a thread; roundhouse's own actors do too) cannot install a Python signal handler.
There the process's main thread calls `forward_sigterm_to_loops()` once: its handler hands
SIGTERM to the guards of the loops running in this process, and to the process's previous
handler when none runs (an idle worker still exits on SIGTERM).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from roundhouse.errors import TrainingError
from roundhouse.runs.status import EXIT_PREEMPTED

logger = logging.getLogger(__name__)


class Preempted(TrainingError):
    """The run was told to stop (SIGTERM) and wrote a complete checkpoint first."""

    exit_code = EXIT_PREEMPTED


class PreemptionGuard:
    """Turns SIGTERM into a stop at the next step boundary, agreed by every rank.

    Args:
        grace_s: the most seconds from the signal to the end of the process.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signalled_at: float | None = None  # when this process got SIGTERM
        self.stop = False  # some rank was signalled: stop after this step
        self.pause = False  # some rank asked to hold the group after this step (a join)
        self.previous: Any = None
        self.installed = False
        self.watchdog: threading.Timer | None = None

    def install(self) -> None:
        """Handle SIGTERM in this process: directly on the main thread; from another thread
        through the main thread's forwarder (`forward_sigterm_to_loops`), if it has one."""
        if threading.current_thread() is not threading.main_thread():
            with _LOCK:
                _LOOPS.append(self)
            if not _FORWARDING:
                logger.debug("not the main thread, no forwarder: SIGTERM keeps its action")
            return
        self.previous = signal.signal(signal.SIGTERM, self._on_signal)
        self.installed = True

    def uninstall(self) -> None:
        """Give SIGTERM back its previous handler."""
        if self.watchdog is not None:
            self.watchdog.cancel()  # the run stopped in time (or ended): nothing to cut short
            self.watchdog = None
        with _LOCK:
            if self in _LOOPS:
                _LOOPS.remove(self)
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous)
            self.installed = False

    def notify(self) -> None:
        """This process got SIGTERM: stop at the next step boundary (what the handler does)."""
        self._on_signal(signal.SIGTERM, None)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
            logger.warning("SIGTERM: checkpointing at the next step boundary")
            self.watchdog = threading.Timer(self.grace_s, self._out_of_time)
            self.watchdog.daemon = True
            self.watchdog.start()

    def _out_of_time(self) -> None:
        logger.error(
            "preempted: no step boundary within cluster.preempt_grace_s=%ss; exiting with "
            "the last complete checkpoint",
            self.grace_s,
        )
        os._exit(EXIT_PREEMPTED)

    def agree(self, all_true: Any, finite: bool, hold: bool = False) -> bool:
        """The loop's per-step vote: True when every rank's loss is finite.

        `all_true` is the strategy's all-reduce of a flag. A signalled rank, or one that asks
        to `hold` the group after this step (live recovery: a replacement waits to join),
        votes false; when the vote fails, a second vote on the losses alone tells a
        non-finite loss apart, and a third tells a SIGTERM (`stop`) from a hold (`pause`).
        """
        if all_true(finite and self.signalled_at is None and not hold):
            return True
        if not all_true(finite):
            return False
        if all_true(self.signalled_at is None):
            self.pause = True
        else:
            self.stop = True
        return True

    def preempted(self, step: int, checkpoint_url: str) -> Preempted:
        """The error that ends a preempted run, after its checkpoint is complete."""
        took = ""
        if self.signalled_at is not None:
            took = f", {time.monotonic() - self.signalled_at:.1f} s after SIGTERM"
        return Preempted(
            f"preempted at step {step}: checkpoint {checkpoint_url} is complete{took}",
            "continue with --resume latest",
        )


# The guards of loops running in threads of this process, and whether the main thread
# forwards SIGTERM to them (see the module docstring).
_LOOPS: list[PreemptionGuard] = []
_LOCK = threading.Lock()
_FORWARDING: list[Any] = []  # the handler it replaced, once installed


def forward_sigterm_to_loops() -> bool:
    """From the main thread: hand SIGTERM to the loops running in this process's threads.

    Idempotent. Returns False (and changes nothing) when called from another thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    if not _FORWARDING:
        _FORWARDING.append(signal.signal(signal.SIGTERM, _forward))
    return True


def sigterm_forwarded() -> bool:
    """Whether this process's main thread forwards SIGTERM to its loops."""
    return bool(_FORWARDING)


def notify_loops() -> bool:
    """Tell the loops running in this process's threads that SIGTERM came (a driver's
    SIGTERM handed on); False when none runs."""
    with _LOCK:
        loops = list(_LOOPS)
    for guard in loops:
        guard.notify()
    return bool(loops)


def _forward(signum: int, frame: Any) -> None:
    if notify_loops():
        return
    previous = _FORWARDING[0]
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:  # the default action: end the process as SIGTERM would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
