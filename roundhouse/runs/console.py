"""Console progress for the training loop: a rich progress bar, plain periodic lines, or nothing.

`build_progress(mode, total_steps)` picks the implementation. Every implementation has the same
three methods: `update` (called at most every `trainer.log_every_steps`, so it must be cheap),
`message` (one line, e.g. evaluation results) and `close`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# Plain mode prints at most one progress line per this many seconds (plus the first and the last
# step): under Ray every worker line travels to the driver, so a line per log step is too chatty.
PLAIN_INTERVAL_S = 10.0


class Progress(Protocol):
    """What the tracker needs from a console."""

    def update(
        self, *, step: int, epoch: int, loss: float | None, samples_per_s: float | None
    ) -> None:
        """Advance the display to `step` with the latest loss and throughput."""

    def message(self, text: str) -> None:
        """Show one line (above the bar, if there is one)."""

    def close(self) -> None:
        """Finish the display."""


def resolve_console_mode(mode: str) -> str:
    """`auto` becomes `rich` on a terminal and `plain` otherwise; other modes pass through."""
    if mode != "auto":
        return mode
    isatty = getattr(sys.stdout, "isatty", None)
    return "rich" if isatty is not None and isatty() else "plain"


def build_progress(mode: str, total_steps: int | None) -> Progress:
    """Make the console for `tracking.console` (`auto | rich | plain | off`)."""
    resolved = resolve_console_mode(mode)
    if resolved == "rich":
        return RichProgress(total_steps)
    if resolved == "plain":
        return PlainProgress(total_steps)
    if resolved == "off":
        return NullProgress()
    raise ValueError(f"tracking.console must be auto, rich, plain or off, got {mode!r}")


def format_duration(seconds: float) -> str:
    """`H:MM:SS` for an ETA."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_metrics(metrics: dict[str, Any]) -> str:
    """`key value` pairs, numbers with 4 significant digits."""
    parts = []
    for key, value in metrics.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


class NullProgress:
    """`tracking.console: off` (and non-main ranks): prints nothing."""

    def update(
        self, *, step: int, epoch: int, loss: float | None, samples_per_s: float | None
    ) -> None:
        """Do nothing."""

    def message(self, text: str) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""


class PlainProgress:
    """Periodic progress lines through `logging` (for log files, CI and Ray workers)."""

    def __init__(self, total_steps: int | None, interval_s: float = PLAIN_INTERVAL_S) -> None:
        self.total_steps = total_steps
        self.interval_s = interval_s
        self._last_emit = float("-inf")
        self._first: tuple[float, int] | None = None  # (time, step) of the first update: ETA base

    def update(
        self, *, step: int, epoch: int, loss: float | None, samples_per_s: float | None
    ) -> None:
        """Log a line when `interval_s` has passed since the last one, or at the last step."""
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        is_last = self.total_steps is not None and step >= self.total_steps
        if now - self._last_emit < self.interval_s and not is_last:
            return
        self._last_emit = now
        logger.info(self._line(now, step, epoch, loss, samples_per_s))

    def _line(
        self, now: float, step: int, epoch: int, loss: float | None, samples_per_s: float | None
    ) -> str:
        total = "?" if self.total_steps is None else str(self.total_steps)
        parts = [f"epoch {epoch}", f"step {step}/{total}"]
        if loss is not None:
            parts.append(f"loss {loss:.4g}")
        if samples_per_s is not None:
            parts.append(f"{samples_per_s:,.0f} samples/s")
        eta = self._eta(now, step)
        if eta is not None:
            parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def _eta(self, now: float, step: int) -> float | None:
        assert self._first is not None
        start_time, start_step = self._first
        if self.total_steps is None or step <= start_step:
            return None
        seconds_per_step = (now - start_time) / (step - start_step)
        return seconds_per_step * max(0, self.total_steps - step)

    def message(self, text: str) -> None:
        """Log one line now (not throttled)."""
        logger.info(text)

    def close(self) -> None:
        """Nothing to stop."""


class RichProgress:
    """A rich progress bar: epoch, step/total, loss, samples/s, ETA.

    The bar starts on the first `update` (not during setup) and redraws from rich's own thread at
    `refresh_per_second`, so `update` only stores numbers under a lock (microseconds).
    """

    def __init__(self, total_steps: int | None, refresh_per_second: float = 2.0) -> None:
        from rich import progress as rp  # rich is cheap, but only the main rank needs it

        self.total_steps = total_steps
        self._progress = rp.Progress(
            rp.TextColumn("epoch {task.fields[epoch]}"),
            rp.BarColumn(),
            rp.MofNCompleteColumn(),
            rp.TextColumn("loss {task.fields[loss]}"),
            rp.TextColumn("{task.fields[samples_per_s]} samples/s"),
            rp.TextColumn("eta"),
            rp.TimeRemainingColumn(),
            refresh_per_second=refresh_per_second,
        )
        self._task: Any = None

    def update(
        self, *, step: int, epoch: int, loss: float | None, samples_per_s: float | None
    ) -> None:
        """Move the bar to `step` and show the latest loss and throughput."""
        fields = {
            "epoch": epoch,
            "loss": "-" if loss is None else f"{loss:.4g}",
            "samples_per_s": "-" if samples_per_s is None else f"{samples_per_s:,.0f}",
        }
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self.total_steps, completed=step, **fields
            )
            return
        self._progress.update(self._task, completed=step, **fields)

    def message(self, text: str) -> None:
        """Print one line above the bar."""
        self._progress.console.print(text, highlight=False, markup=False)

    def close(self) -> None:
        """Stop the bar (leaves its last state on screen)."""
        if self._task is not None:
            self._progress.stop()
            self._task = None
