"""Job files: YAML -> `JobSpec`, `key.sub=value` overrides, and a run folder's `job.yaml`.

Every job a command reads goes through here (and `validation.validate_model`), so every bad job
is one line: `error: <file>: <key>: <problem> (<fix>)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from roundhouse.config import JobSpec
from roundhouse.config.validation import validate_model
from roundhouse.errors import JobFileError


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The job file as a dict; a missing, unreadable or non-mapping file is a `JobFileError`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise JobFileError(f"job file {str(path)!r} does not exist", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobFileError(f"cannot read job file {str(path)!r}: {exc}", "check the file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise JobFileError(
            f"invalid YAML in {str(path)!r}{where}: {problem}", "fix the YAML syntax"
        ) from None
    if not isinstance(data, dict):
        raise JobFileError(
            f"job file {str(path)!r} must be a mapping of sections, got {type(data).__name__}",
            "start from configs/quickstart.yaml",
        )
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` entries in a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise JobFileError(
                f"override {item!r} is not of the form key.sub=value", "e.g. trainer.max_epochs=3"
            )
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise JobFileError(
                    f"override {item!r}: {part!r} is not a section",
                    "override its keys, not inside a value",
                )
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Read, override and validate a job file into a `JobSpec`."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_job(data, source=str(path))


def validate_job(data: dict[str, Any], source: str = "job") -> JobSpec:
    """Validate a job dict; the first problem becomes a one-line `JobFileError`."""
    return validate_model(JobSpec, data, source)


def parse_job_text(text: str, source: str) -> JobSpec:
    """A job from YAML text read elsewhere (a run folder's `job.yaml` on any fsspec URL)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobFileError(f"invalid YAML in {source!r}: {exc}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise JobFileError(f"{source!r} is not a mapping of job sections", "check the file")
    return validate_job(data, source)
