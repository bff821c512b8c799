"""Job files: YAML -> `JobSpec`, `key.sub=value` overrides, and readable validation errors."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from roundhouse.config import JobSpec, StrategySection, strategy_sections
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
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        if not _strategy_kind_unknown(exc):
            raise JobFileError(*describe_validation_error(exc, source)) from None
    # A strategy's section registers when its module is imported: import them all, then retry.
    import roundhouse.parallel.registry  # noqa: F401  (slow: imported only for an unknown kind)

    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(*describe_validation_error(exc, source)) from None


def _strategy_kind_unknown(exc: ValidationError) -> bool:
    return any(
        err["type"] == "union_tag_invalid" and tuple(err["loc"]) == ("strategy",)
        for err in exc.errors(include_url=False)
    )


def describe_validation_error(exc: ValidationError, source: str) -> tuple[str, str]:
    """(what, fix) for the first error pydantic reports, naming the key and its valid keys."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in _strip_tags(loc)) or "<root>"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        valid = sorted(section_at(loc[:-1]).model_fields)
        return f"{source}: unknown key {key!r}{more}", f"valid keys here: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"{source}: missing required key {key!r}{more}", "add it to the job file"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f", got {got!r}"
    return (
        f"{source}: {key}: {first['msg']}{got_text}{more}",
        "see `roundhouse schema` for the valid values",
    )


def _strip_tags(loc: tuple) -> tuple:
    """Drop the union tag pydantic puts in locations (`strategy.ring.bucket_mb`)."""
    return tuple(
        p for i, p in enumerate(loc) if not (i > 0 and loc[i - 1] == "strategy" and i == 1)
    )


def section_at(loc: tuple) -> type[BaseModel]:
    """The pydantic model class at a location inside `JobSpec` (following union tags)."""
    cls: type[BaseModel] = JobSpec
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        ann = cls.model_fields[part].annotation
        members = [m for m in _flatten(ann) if isinstance(m, type) and issubclass(m, BaseModel)]
        if members[0] is StrategySection and parts:  # the open union: the next part is the kind
            members = [strategy_sections()[parts.pop(0)]]
        elif len(members) > 1 and parts:  # a tagged union: the next location part is the tag
            tag = parts.pop(0)
            members = [
                m for m in members if tag in typing.get_args(m.model_fields["kind"].annotation)
            ]
        cls = members[0]
    return cls


def _flatten(ann: Any) -> list[Any]:
    origin = typing.get_origin(ann)
    if origin is typing.Annotated:
        return _flatten(typing.get_args(ann)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(ann) for m in _flatten(arg)]
    return [ann]
