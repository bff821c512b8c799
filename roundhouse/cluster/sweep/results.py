"""A sweep's folder and its outcome: `tune-<id>/`, the results table and the best job file.

Pure Python over the run folders the trials wrote (no ray): `summarize` reads each trial's run
back, `format_table` prints it, `write_outcome` writes `results.tsv` and `best.yaml`.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from roundhouse.cluster.sweep.space import SearchError, apply_params
from roundhouse.config import JobSpec

SWEEP_PREFIX = "tune-"
BEST_JOB, RESULTS = "best.yaml", "results.tsv"


def count_evaluations(job: JobSpec) -> int:
    """Evaluations a full run makes: one per epoch end, plus every `eval_every_steps`."""
    from roundhouse.cluster.progress import estimate_total_steps

    cfg = job.trainer
    if cfg.eval_every_steps is None and cfg.max_steps is None and cfg.max_epochs is not None:
        return cfg.max_epochs
    total = estimate_total_steps(job) or cfg.max_steps or 1
    per_steps = total // cfg.eval_every_steps if cfg.eval_every_steps else 0
    return max(1, per_steps + (cfg.max_epochs or 1))


def resolve_mode(metric: str, mode: str | None) -> str:
    """`--mode`, or min for losses and max otherwise when it is not given."""
    from roundhouse.runs.reader import lower_is_better

    return mode or ("min" if lower_is_better(metric) else "max")


def sweep_folder(job: JobSpec, resume: str | None) -> tuple[str, str]:
    """(url, id) of the sweep folder: a new `tune-<id>`, or the one `--resume` names."""
    from roundhouse.runs.rundir import RunDir, job_folder, new_run_id

    parent = job_folder(job)
    if resume is None:
        sweep_id = SWEEP_PREFIX + new_run_id()
        return f"{parent.url}/{sweep_id}", sweep_id
    if resume == "latest":
        sweeps = [n for n in parent.listdir() if n.startswith(SWEEP_PREFIX)]
        if not sweeps:
            raise SearchError(f"no sweep under {parent.url} to resume", "run it without --resume")
        return f"{parent.url}/{sweeps[-1]}", sweeps[-1]
    if "/" not in resume and resume.startswith(SWEEP_PREFIX):
        return f"{parent.url}/{resume}", resume
    folder = RunDir(resume)
    return folder.url, folder.url.rsplit("/", 1)[-1]


def summarize(results: Any, plan: Any) -> list[dict[str, Any]]:
    """One row per trial, read back from its run folder: values, status, evaluations,
    best and last metric, the test metric. Trials the scheduler stopped are marked so."""
    from roundhouse.runs.reader import read_run
    from roundhouse.runs.rundir import RunDir
    from roundhouse.runs.status import RUNNING, STOPPED, write_status

    rows = []
    for result in results:
        trial = result.path.rstrip("/").rsplit("/", 1)[-1]
        folder = RunDir(f"{plan.sweep_url}/{trial}")
        run = read_run(folder.url) if folder.exists("job.yaml") else None
        status = "error" if result.error else (run.status if run else "-")
        if run is not None and (run.status_record or {}).get("status") == RUNNING:
            status = STOPPED  # the scheduler ended it early
            kept = {k: v for k, v in run.status_record.items() if k in ("started", "world_size")}
            write_status(folder, status, **kept)
        values = [v for _, _, v in run.series(plan.metric)] if run else []
        best = (min if plan.mode == "min" else max)(values) if values else None
        test = plan.metric.replace("val/", "test/", 1)
        rows.append(
            {
                "trial": trial,
                "config": {p.key: (result.config or {}).get(p.key) for p in plan.params},
                "status": status,
                "evals": len(values),
                "last": values[-1] if values else None,
                "best": best,
                "test": run.final(test) if run else None,
            }
        )
    rows.sort(key=lambda r: _rank_key(r, plan.mode))
    return rows


def check_some_trial_ran(results: Any, rows: list[dict[str, Any]]) -> None:
    """Every trial failing is the job's fault, not a search result: say why, exit 2."""
    from roundhouse.cluster.workers import unwrap_worker_error

    if not rows or any(r["status"] != "error" for r in rows):
        return
    error = next(r.error for r in results if r.error)
    raise unwrap_worker_error(error) from error


def _rank_key(row: dict[str, Any], mode: str) -> float:
    best = row["best"]
    if best is None or not math.isfinite(best):
        return math.inf
    return best if mode == "min" else -best


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def table_cells(rows: list[dict[str, Any]], plan: Any) -> list[list[str]]:
    """The results table as cells, header first, best trial next."""
    keys = [p.key for p in plan.params]
    test = plan.metric.replace("val/", "test/", 1)
    header = ["trial", *keys, "status", "evals", f"best {plan.metric}", f"last {plan.metric}", test]
    table = [header]
    for row in rows:
        table.append(
            [
                row["trial"],
                *(_fmt(row["config"][k]) for k in keys),
                row["status"],
                str(row["evals"]),
                _fmt(row["best"]),
                _fmt(row["last"]),
                _fmt(row["test"]),
            ]
        )
    return table


def format_table(rows: list[dict[str, Any]], plan: Any) -> list[str]:
    """The results table as aligned text lines."""
    table = table_cells(rows, plan)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]


def write_outcome(rows: list[dict[str, Any]], plan: Any) -> str | None:
    """`results.tsv` and the best trial's resolved job (`best.yaml`) in the sweep folder."""
    from roundhouse.runs.rundir import RunDir
    from roundhouse.runs.tracking import redact_secrets

    folder = RunDir(plan.sweep_url)
    cells = table_cells(rows, plan)
    folder.write_text(RESULTS, "".join("\t".join(r) + "\n" for r in cells))
    if not rows or rows[0]["best"] is None:
        return None
    best = apply_params(plan.job, rows[0]["config"])
    data = redact_secrets(best.model_dump(mode="json"))
    header = (
        f"# best trial {rows[0]['trial']} of {plan.sweep_id}: {plan.metric} {rows[0]['best']:.4g}\n"
    )
    folder.write_text(BEST_JOB, header + yaml.safe_dump(data, sort_keys=False))
    return folder.url_of(BEST_JOB)
