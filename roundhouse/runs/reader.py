"""Run folders read back, for `roundhouse runs list|compare|plot`.

Pure Python over fsspec (no torch): a run folder is any folder holding `job.yaml`, found
under a storage path at any depth (sweeps nest theirs as `<name>/tune-<id>/<trial>/`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import fsspec
import yaml

from roundhouse.errors import RoundhouseError
from roundhouse.runs.status import STATUS_FILE, effective_status

logger = logging.getLogger(__name__)

JOB_FILE, METRICS_FILE = "job.yaml", "metrics.jsonl"
# Folders inside a run folder (or a sweep's Ray bookkeeping) that never hold runs.
SKIP_FOLDERS = frozenset({"checkpoints", "wandb", "ranks", "ray", ".ray_results"})
MAX_DEPTH = 5


class RunsError(RoundhouseError):
    """A run folder or storage path that cannot be read."""


@dataclass
class RunRecord:
    """One run folder: its resolved job, status record and metric rows."""

    url: str
    job: dict[str, Any]
    status_record: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        """The run folder's name (its id)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def name(self) -> str:
        """The job's name."""
        return str(self.job.get("name", "?"))

    @property
    def strategy(self) -> str:
        """The job's `strategy.kind`."""
        return str((self.job.get("strategy") or {}).get("kind", "?"))

    @property
    def workers(self) -> int:
        """Workers it ran on (`--local`: 1), else the job's `cluster.num_workers`."""
        recorded = (self.status_record or {}).get("world_size")
        return int(recorded or (self.job.get("cluster") or {}).get("num_workers", 1))

    @property
    def status(self) -> str:
        """finished, failed, running or killed (a running record whose process is gone)."""
        return effective_status(self.status_record)

    @property
    def steps(self) -> int:
        """The last step the run logged."""
        return max((int(r.get("step", 0)) for r in self.rows), default=0)

    @property
    def duration_s(self) -> float | None:
        """From the run's start (status record, else its first row) to its last row."""
        times = [float(r["time"]) for r in self.rows if "time" in r]
        start = (self.status_record or {}).get("started") or (min(times) if times else None)
        end = max(times, default=None)
        if self.status_record and self.status_record.get("status") != "running":
            end = max(end or 0.0, float(self.status_record.get("time", 0.0)))
        return None if start is None or end is None else max(0.0, end - float(start))

    def series(self, metric: str) -> list[tuple[int, float, float]]:
        """(step, time, value) of every row that logged `metric`."""
        return [
            (int(r.get("step", 0)), float(r.get("time", 0.0)), float(r[metric]))
            for r in self.rows
            if isinstance(r.get(metric), (int, float))
        ]

    def final(self, metric: str) -> float | None:
        """The last logged value of `metric`, or None."""
        points = self.series(metric)
        return points[-1][2] if points else None

    def best(self, metric: str) -> float | None:
        """The best value of `metric`: the lowest for losses, else the highest."""
        values = [v for _, _, v in self.series(metric) if math.isfinite(v)]
        if not values:
            return None
        return min(values) if lower_is_better(metric) else max(values)

    def metric_names(self) -> list[str]:
        """Every metric the run logged (`section/name` keys)."""
        return sorted({k for r in self.rows for k in r if "/" in k})


def lower_is_better(metric: str) -> bool:
    """Losses, perplexities and error rates go down; accuracies go up."""
    tail = metric.rsplit("/", 1)[-1]
    return any(word in tail for word in ("loss", "perplexity", "error", "bits_per"))


def default_val_metric(run: RunRecord) -> str | None:
    """`val/accuracy` when the run logs it, else `val/loss`, else None."""
    names = run.metric_names()
    for metric in ("val/accuracy", "val/loss"):
        if metric in names:
            return metric
    return next((n for n in names if n.startswith("val/")), None)


def parse_rows(text: str) -> list[dict[str, Any]]:
    """The JSON object rows of a `metrics.jsonl` text (lines cut short by a crash skipped)."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_run(url: str) -> RunRecord:
    """Read one run folder (`job.yaml`, `status.json`, `metrics.jsonl`)."""
    fs, path = fsspec.core.url_to_fs(url)
    path = path.rstrip("/")
    if not fs.exists(f"{path}/{JOB_FILE}"):
        raise RunsError(f"{url!r} is not a run folder (no {JOB_FILE})", "pass a run folder")
    job = yaml.safe_load(fs.cat_file(f"{path}/{JOB_FILE}").decode()) or {}
    status = None
    if fs.exists(f"{path}/{STATUS_FILE}"):
        try:
            status = json.loads(fs.cat_file(f"{path}/{STATUS_FILE}").decode())
        except json.JSONDecodeError:
            status = None
    rows: list[dict[str, Any]] = []
    if fs.exists(f"{path}/{METRICS_FILE}"):
        rows = parse_rows(fs.cat_file(f"{path}/{METRICS_FILE}").decode(errors="replace"))
    return RunRecord(url=url.rstrip("/"), job=job, status_record=status, rows=rows)


def find_run_urls(storage: str) -> list[str]:
    """Every run folder under `storage` (depth first, sorted), not descending into runs."""
    fs, root = fsspec.core.url_to_fs(storage)
    if not fs.isdir(root):
        raise RunsError(f"storage path {storage!r} does not exist", "pass the job's storage.path")
    prefix = storage.rstrip("/")[: len(storage.rstrip("/")) - len(root.rstrip("/"))]
    found: list[str] = []
    pending = [(root.rstrip("/"), 0)]
    while pending:
        folder, depth = pending.pop()
        entries = fs.ls(folder, detail=True)
        names = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
        if JOB_FILE in names:
            found.append(prefix + folder)
            continue
        if depth >= MAX_DEPTH:
            continue
        for name, entry in names.items():
            if entry["type"] == "directory" and name not in SKIP_FOLDERS:
                pending.append((f"{folder}/{name}", depth + 1))
    return sorted(found)


def list_runs(storage: str, name: str | None = None) -> list[RunRecord]:
    """The runs under `storage` (of job `name` only, when given), oldest first."""
    runs = []
    for url in find_run_urls(storage):
        try:
            run = read_run(url)
        except (OSError, yaml.YAMLError, RunsError) as exc:
            logger.warning("skipping %s: %s", url, exc)
            continue
        if name is None or run.name == name:
            runs.append(run)
    return sorted(runs, key=lambda r: (r.duration_s is None, _start(r), r.url))


def _start(run: RunRecord) -> float:
    times = [float(r["time"]) for r in run.rows if "time" in r]
    return float((run.status_record or {}).get("started") or min(times, default=0.0))


def resolve_run(ref: str, storage: str) -> RunRecord:
    """A run named by its folder (path or URL) or by its run id under `storage`."""
    fs, path = fsspec.core.url_to_fs(ref)
    if fs.exists(f"{path.rstrip('/')}/{JOB_FILE}"):
        return read_run(ref)
    matches = [u for u in find_run_urls(storage) if u.rstrip("/").rsplit("/", 1)[-1] == ref]
    if len(matches) != 1:
        found = "no run" if not matches else f"{len(matches)} runs"
        raise RunsError(
            f"{found} named {ref!r} under {storage!r}",
            "pass a run folder path, or a run id from `roundhouse runs list`",
        )
    return read_run(matches[0])


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differing_keys(runs: list[RunRecord]) -> list[str]:
    """Job keys whose values are not the same in every run (run ids left out)."""
    flat = [flatten(run.job) for run in runs]
    keys = sorted(set().union(*flat))
    return [
        k
        for k in keys
        if k != "storage.run_id" and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1
    ]
