"""Validating a dict into a config model, with the one-line error a user can act on.

`validate_model(JobSpec, data, source)` is the only way a job dict becomes a `JobSpec`: a job
file, a `key=value` override, a run folder's `job.yaml`, a sweep's trial, a worker's copy or a
job with another strategy (`JobSpec.with_strategy`). Pydantic's first error becomes a
`JobFileError` naming the key, the value and the valid keys there (`section_at`).
"""

from __future__ import annotations

import importlib
import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from roundhouse.errors import JobFileError

from .strategy_section import StrategySection, strategy_sections

Model = TypeVar("Model", bound=BaseModel)
# The module whose import registers every built-in strategy's section. Imported by name, and
# only for a strategy kind not yet registered, so that config/ stays below parallel/.
STRATEGY_REGISTRY = "roundhouse.parallel.registry"
# Keys a job file may still carry from an older roundhouse -> where they live now.
MOVED_KEYS = {
    "cluster.ps_resources": "strategy.server_resources (the parameter server's own section)",
}


def validate_model(root: type[Model], data: dict[str, Any], source: str = "job") -> Model:
    """Validate `data` into `root`; the first problem becomes a one-line `JobFileError`."""
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        if not _strategy_kind_unknown(exc):
            raise JobFileError(*describe_validation_error(exc, source, root)) from None
    # A strategy's section registers when its module is imported: import them all, then retry.
    importlib.import_module(STRATEGY_REGISTRY)
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        raise JobFileError(*describe_validation_error(exc, source, root)) from None


def _strategy_kind_unknown(exc: ValidationError) -> bool:
    return any(
        err["type"] == "union_tag_invalid" and tuple(err["loc"]) == ("strategy",)
        for err in exc.errors(include_url=False)
    )


def describe_validation_error(
    exc: ValidationError, source: str, root: type[BaseModel]
) -> tuple[str, str]:
    """(what, fix) for the first error pydantic reports, naming the key and its valid keys."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in _strip_tags(loc)) or "<root>"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        if key in MOVED_KEYS:
            return f"{source}: {key!r} has moved{more}", f"write it as {MOVED_KEYS[key]}"
        valid = sorted(section_at(loc[:-1], root).model_fields)
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


def section_at(loc: tuple, root: type[BaseModel]) -> type[BaseModel]:
    """The pydantic model class at a location inside `root` (following union tags)."""
    cls: type[BaseModel] = root
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
