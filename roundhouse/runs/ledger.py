"""The sample ledger: which samples every rank trained at every step, and its verification.

With `trainer.ledger: true` each rank appends one JSON line per committed optimizer step to
`ledger/rank_<r>.jsonl` in the run folder::

    {"e": epoch, "s": step in epoch, "gs": global step, "n": global batch of the step,
     "r": rank, "w": world size, "t": unix time, "i": [dataset indices this rank trained]}

Rank 0 writes `ledger/meta.json` (samples, global batch and steps of an epoch) once, and
`ledger/resumes.jsonl` gets a line `{"step": k, "t": time}` whenever training continues from
step k: a `--resume` from a checkpoint, or survivors re-forming after a worker died. A line of
global step > k written before such a resume was undone (its update is not in the weights that
went on), so `verify_ledger` ignores it; everything else must add up: over each epoch every
sample of the steps that ran is trained exactly once.

On object stores (no append) a rank's lines go to numbered part files, one per
`REMOTE_FLUSH_STEPS` steps, written whole.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from roundhouse.errors import RoundhouseError
from roundhouse.runs.rundir import RunDir

LEDGER = "ledger"
META = "meta.json"
RESUMES = "resumes.jsonl"
REMOTE_FLUSH_STEPS = 50


class LedgerError(RoundhouseError):
    """A run folder without a ledger, or a ledger that cannot be read."""


@dataclass(frozen=True)
class EpochPlan:
    """The batch arithmetic of one epoch, for counting what each step should train."""

    num_samples: int
    global_batch: int
    steps_per_epoch: int

    def step_size(self, step: int) -> int:
        """Samples in step `step` of an epoch (the last may be partial)."""
        return max(0, min(self.global_batch, self.num_samples - step * self.global_batch))


class LedgerWriter:
    """Appends this rank's trained indices per committed step to the run folder.

    Args:
        run_dir: the run folder.
        rank: this worker's rank (names the file; lines also carry the rank).
    """

    def __init__(self, run_dir: RunDir, rank: int) -> None:
        self.run_dir, self.rank = run_dir, rank
        self.pending: list[str] = []
        self.part = len(run_dir.listdir(LEDGER))  # remote: never overwrite an earlier part
        self.file: Any = None
        if run_dir.is_local:
            path = run_dir.join(LEDGER, f"rank_{rank}.jsonl")
            run_dir.fs.makedirs(run_dir.join(LEDGER), exist_ok=True)
            drop_cut_line(path)  # a worker killed mid-line wrote this rank's file before
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write_meta(self, plan: EpochPlan) -> None:
        """Record the epoch arithmetic (rank 0, once per run start)."""
        self.run_dir.write_text(f"{LEDGER}/{META}", json.dumps(asdict(plan)))

    def record(self, entry: dict[str, Any]) -> None:
        """One committed step: `entry` holds `e, s, gs, n, w, i` (see the module docstring)."""
        line = json.dumps({**entry, "r": self.rank, "t": time.time()}, separators=(",", ":"))
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()  # a killed process keeps every committed step's line
            return
        self.pending.append(line)
        if len(self.pending) >= REMOTE_FLUSH_STEPS:
            self.flush()

    def mark_resume(self, step: int) -> None:
        """Training continues from global step `step`: later lines written before now are void."""
        mark_resume(self.run_dir, step)

    def flush(self) -> None:
        """Write buffered lines (object stores: as the next part file)."""
        if self.file is not None:
            self.file.flush()
        elif self.pending:
            name = f"{LEDGER}/rank_{self.rank}.part{self.part:06d}.jsonl"
            self.run_dir.write_text(name, "\n".join(self.pending) + "\n")
            self.pending, self.part = [], self.part + 1

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        if self.file is not None:
            self.file.close()
            self.file = None


def mark_resume(run_dir: RunDir, step: int) -> None:
    """Record that training continues from global step `step` (see the module docstring)."""
    line = json.dumps({"step": step, "t": time.time()}) + "\n"
    if run_dir.is_local:
        with open(run_dir.join(LEDGER, RESUMES), "a", encoding="utf-8") as f:
            f.write(line)
        return
    run_dir.write_text(f"{LEDGER}/resume_{time.time_ns()}.jsonl", line)


def drop_cut_line(path: str) -> None:
    """Cut a last line left without its newline (its writer was killed mid-line: that step
    never committed), so that lines appended now start on a line of their own. Live recovery
    hands a lost worker's rank, and so its file, to another process."""
    try:
        f = open(path, "rb+")  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, 2)
        if end == 0 or (f.seek(end - 1), f.read(1))[1] == b"\n":
            return
        start = end
        while start > 0:  # back, a block at a time, to the last newline (or the file's start)
            start = max(0, start - 65536)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
        f.truncate(0)


@dataclass
class EpochReport:
    """What one epoch trained: steps seen, samples trained, duplicates and missing samples."""

    epoch: int
    steps: int
    trained: int
    duplicates: int
    missing: int


@dataclass
class LedgerReport:
    """The verdict over a whole run (`ok` when no epoch has a duplicate or a missing sample)."""

    epochs: list[EpochReport] = field(default_factory=list)
    ignored_lines: int = 0  # lines of steps undone by a later resume

    @property
    def duplicates(self) -> int:
        """Samples trained more than once within an epoch, over all epochs."""
        return sum(e.duplicates for e in self.epochs)

    @property
    def missing(self) -> int:
        """Samples of the steps that ran that no rank trained, over all epochs."""
        return sum(e.missing for e in self.epochs)

    @property
    def ok(self) -> bool:
        """Every epoch trained each sample of its steps exactly once."""
        return self.duplicates == 0 and self.missing == 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `runs verify --json`)."""
        return {
            "ok": self.ok,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "ignored_lines": self.ignored_lines,
            "epochs": [asdict(e) for e in self.epochs],
        }


def read_ledger(run_dir: RunDir) -> tuple[EpochPlan, list[dict], list[dict]]:
    """The meta, the step lines and the resume records of a run's ledger."""
    if not run_dir.exists(LEDGER, META):
        raise LedgerError(
            f"run {run_dir.url} has no sample ledger",
            "train with trainer.ledger=true to record one",
        )
    plan = EpochPlan(**json.loads(run_dir.read_text(LEDGER, META)))
    lines, resumes = [], []
    for name in run_dir.listdir(LEDGER):
        if not name.endswith(".jsonl"):
            continue
        target = resumes if name.startswith(("resume", RESUMES)) else lines
        target.extend(_parse_lines(run_dir, name))
    return plan, lines, resumes


def _parse_lines(run_dir: RunDir, name: str) -> list[dict]:
    records = []
    texts = run_dir.read_text(LEDGER, name).splitlines()
    for number, text in enumerate(texts, 1):
        if not text.strip():
            continue
        try:
            records.append(json.loads(text))
        except json.JSONDecodeError as exc:
            if number == len(texts):
                continue  # a last line cut short by a kill: that step never committed
            raise LedgerError(f"{LEDGER}/{name} line {number} is not JSON: {exc}") from exc
    return records


def live_lines(lines: list[dict], resumes: list[dict]) -> tuple[list[dict], int]:
    """Drop lines of steps a later resume undid; return the rest and how many were dropped."""
    kept = [
        line
        for line in lines
        if not any(line["gs"] > r["step"] and line["t"] < r["t"] for r in resumes)
    ]
    return kept, len(lines) - len(kept)


def verify_ledger(run_dir: RunDir) -> LedgerReport:
    """Check that each epoch trained every sample of the steps that ran exactly once.

    Duplicates: every extra occurrence of an index within an epoch. Missing: per step, its
    size minus the distinct samples trained in it, with a step absent from the ledger (below
    the epoch's last recorded step, or anywhere in an epoch that is not the last) missing all
    of its samples.
    """
    plan, lines, resumes = read_ledger(run_dir)
    kept, ignored = live_lines(lines, resumes)
    by_epoch: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for line in kept:
        by_epoch[line["e"]][line["s"]].extend(line["i"])
    report = LedgerReport(ignored_lines=ignored)
    last_epoch = max(by_epoch, default=-1)
    for epoch in sorted(by_epoch):
        steps = by_epoch[epoch]
        end = max(steps) + 1 if epoch == last_epoch else plan.steps_per_epoch
        report.epochs.append(_check_epoch(epoch, steps, end, plan))
    return report


def _check_epoch(epoch: int, steps: dict[int, list[int]], end: int, plan: EpochPlan) -> EpochReport:
    counts = Counter(i for indices in steps.values() for i in indices)
    duplicates = sum(c - 1 for c in counts.values())
    missing = 0
    for step in range(end):
        missing += max(0, plan.step_size(step) - len(set(steps.get(step, []))))
    return EpochReport(epoch, len(steps), sum(counts.values()), duplicates, missing)
