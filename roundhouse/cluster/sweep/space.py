"""`--search KEY=EXPR` for `roundhouse tune`: parsed and checked here, before Ray starts.

Expressions: `uniform(lo,hi)`, `loguniform(lo,hi)`, `randint(lo,hi)` (hi excluded),
`choice(a,b,...)` and `grid(a,b,...)`. Values are Python literals (numbers, strings, lists).
`tuner.py` turns a `SearchParam` into Ray Tune's search space; this module imports no
Ray, so a bad search is a one-line error before anything starts.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any

from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.errors import RoundhouseError

KINDS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None, "grid": None}
EXPRESSION = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.DOTALL)
FIX = "write KEY=uniform(lo,hi) | loguniform(lo,hi) | randint(lo,hi) | choice(a,b,..) | grid(..)"


class SearchError(RoundhouseError):
    """A `--search`, `--metric` or searcher choice that cannot work."""


@dataclass(frozen=True)
class SearchParam:
    """One searched job key: `kind` is a key of `KINDS`, `values` its arguments."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def examples(self) -> list[Any]:
        """Values this parameter can take, to check them against the job schema."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


def parse_search(text: str) -> SearchParam:
    """`trainer.optimizer.lr=loguniform(1e-4,1e-2)` -> SearchParam; bad text -> SearchError."""
    key, sep, expr = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SearchError(f"--search {text!r} is not KEY=EXPR", FIX)
    match = EXPRESSION.match(expr)
    if match is None or match.group(1) not in KINDS:
        raise SearchError(f"--search {text!r}: {expr!r} is not a search expression", FIX)
    kind = match.group(1)
    try:
        values = ast.literal_eval(f"({match.group(2)},)") if match.group(2).strip() else ()
    except (ValueError, SyntaxError):
        raise SearchError(f"--search {text!r}: arguments must be literals", FIX) from None
    check_arguments(text, kind, tuple(values))
    return SearchParam(key, kind, tuple(values))


def check_arguments(text: str, kind: str, values: tuple[Any, ...]) -> None:
    """Argument counts and ranges: two ordered bounds, or at least one value."""
    arity = KINDS[kind]
    if arity is None:
        if not values:
            raise SearchError(f"--search {text!r}: {kind}() needs at least one value", FIX)
        return
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if len(values) != arity or not numeric or not values[0] < values[1]:
        raise SearchError(f"--search {text!r}: {kind} needs two numbers lo < hi", FIX)
    if kind == "loguniform" and values[0] <= 0:
        raise SearchError(f"--search {text!r}: loguniform needs lo > 0", FIX)
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        raise SearchError(f"--search {text!r}: randint needs integers", FIX)


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` in a nested job dict (creating sections)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SearchError(f"search key {key!r}: {part!r} is not a section", "search its keys")
        node = child
    node[parts[-1]] = value


def apply_params(job: JobSpec, values: dict[str, Any]) -> JobSpec:
    """The job with searched keys set to `values` (dotted key -> value), validated."""
    data = job.model_dump(mode="json")
    for key, value in values.items():
        set_key(data, key, value)
    return validate_job(data, source="sweep")


def check_params(job: JobSpec, params: list[SearchParam]) -> None:
    """Every searched key exists in the job schema and takes every searched value."""
    seen: set[str] = set()
    for param in params:
        if param.key in seen:
            raise SearchError(f"--search {param.key!r} is given twice", "search each key once")
        seen.add(param.key)
        for value in param.examples():
            try:
                searched = apply_params(job, {param.key: value})
                if param.key.startswith("task."):  # free-form options: the task checks them
                    build_task_of(searched)
            except RoundhouseError as exc:
                raise SearchError(
                    f"--search {param.key}: {exc.what.removeprefix('sweep: ')}",
                    "search keys of the job schema (`roundhouse schema`) with valid values",
                ) from None


def check_searcher(searcher: str, params: list[SearchParam]) -> None:
    """Grid search takes grid/choice values only; Bayesian search takes no grid."""
    if searcher == "grid":
        bad = [p.key for p in params if p.kind not in ("grid", "choice")]
        if bad:
            raise SearchError(
                f"--searcher grid cannot enumerate {bad[0]} (a continuous range)",
                "use grid(...) or choice(...) values, or --searcher random",
            )
    if searcher == "bayes" and any(p.kind == "grid" for p in params):
        raise SearchError(
            "--searcher bayes does not take grid(...) values", "use choice(...) instead"
        )


def grid_size(params: list[SearchParam]) -> int:
    """Points of the grid spanned by the `grid(...)` parameters (1 without any)."""
    return math.prod(len(p.values) for p in params if p.kind == "grid")


def build_task_of(job: JobSpec) -> Any:
    """The job's `Task`, as its workers build it (its options checked on the way)."""
    from roundhouse.trainer.task import build_named_task
    from roundhouse.trainer.tasks_regression import job_task_kind

    return build_named_task(job, job.task.name or job_task_kind(job))


def known_metrics(job: JobSpec) -> list[str]:
    """The `val/` metrics the job's task logs at every evaluation (`Task.metric_names`; a
    task that declares none: `loss`)."""
    names = build_task_of(job).metric_names() or ("loss",)
    return sorted(f"val/{n}" for n in names)


def check_metric(job: JobSpec, metric: str) -> None:
    """The metric must be a validation metric the job's task logs."""
    valid = known_metrics(job)
    if metric not in valid:
        raise SearchError(
            f"--metric {metric!r} is never logged by this job's evaluations",
            f"valid: {', '.join(valid)}",
        )
