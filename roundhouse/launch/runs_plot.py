"""`roundhouse runs plot`: metric curves of several runs in one PNG (matplotlib, Agg)."""

from __future__ import annotations

import logging
import os

from roundhouse.runs.reader import RunRecord, RunsError

logger = logging.getLogger(__name__)


def plot_runs(runs: list[RunRecord], metrics: list[str], out: str, *, x: str = "step") -> str:
    """One panel per metric, one line per run; x in optimizer steps or seconds since start.

    Raises:
        RunsError: no metric given, or a metric none of the runs logged.
    """
    if not metrics:
        raise RunsError("--metrics is empty", "e.g. --metrics train/loss,val/accuracy")
    for metric in metrics:
        if not any(run.series(metric) for run in runs):
            logged = sorted({m for r in runs for m in r.metric_names()})
            raise RunsError(
                f"no run logged {metric!r}", f"logged: {', '.join(logged) or 'nothing yet'}"
            )
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for run in runs:
            draw_series(ax, run, metric, x)
        ax.set_title(metric)
        ax.set_xlabel("step" if x == "step" else "seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    logger.debug("plotted %d run(s) to %s", len(runs), out)
    return out


def draw_series(ax: object, run: RunRecord, metric: str, x: str) -> None:
    """Plot one run's `metric` on `ax` against steps or seconds (nothing if it never logged it)."""
    points = run.series(metric)
    if not points:
        return
    start = min((float(r["time"]) for r in run.rows if "time" in r), default=0.0)
    xs = [step if x == "step" else t - start for step, t, _ in points]
    ys = [value for _, _, value in points]
    ax.plot(xs, ys, marker="o" if len(points) < 30 else None, label=run.run_id)  # type: ignore[attr-defined]
