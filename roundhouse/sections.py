"""The bottom of the job schema: the base of every job-file section, and the open `strategy`
section, a tagged union on `kind` that grows as strategies define their sections.

This module imports only pydantic, so that `roundhouse.config` (the job schema) and each
strategy package's torch-free section module (`roundhouse/parallel/<name>/section.py`) can
both build on it: config imports those section modules, so they may not import config.
`roundhouse.config.base` and `roundhouse.config.strategy_section` re-export these names.

Every strategy's job-file section subclasses `StrategySection` with a `kind: Literal[...]`
field. Defining the subclass registers it under its kind, and `JobSpec.strategy` validates
against every section registered so far, as a pydantic tagged union: error locations name the
kind (`strategy.ring.bucket_mb`) and `roundhouse schema` lists every section. So a new strategy
declares its section in its own package, and needs no edit here.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler
from pydantic_core import core_schema

NonNegInt = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    """Base of every job-file section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_SECTIONS: dict[str, type[StrategySection]] = {}
_ON_REGISTER: list[Callable[[], None]] = []


class StrategySection(Section):
    """Base of every `strategy` section. Subclasses declare `kind: Literal["name"]`."""

    kind: str

    def resolve_in(self, job: Any) -> None:
        """Checks and defaults of this section that depend on the rest of the job, run when
        `job` (the `JobSpec`) is validated; may set fields of this section. Default: none.

        Raises:
            ValueError: The section does not work with the rest of the job (fields named).
        """

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Register the new section under each value of its `kind` literal."""
        super().__pydantic_init_subclass__(**kwargs)
        kinds = typing.get_args(cls.model_fields["kind"].annotation)
        if not kinds:
            raise TypeError(f"{cls.__name__}.kind must be a Literal of the strategy's kind(s)")
        for kind in kinds:
            _SECTIONS[kind] = cls
        for rebuild in _ON_REGISTER:
            rebuild()


class _OpenUnion:
    """Annotation marker: validate as the tagged union of the sections registered so far."""

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        choices = {kind: handler.generate_schema(section) for kind, section in _SECTIONS.items()}
        return core_schema.tagged_union_schema(choices, discriminator="kind")


StrategyConfig = Annotated[StrategySection, _OpenUnion()]
"""The type of `JobSpec.strategy`: any registered section, chosen by its `kind`."""


def strategy_sections() -> dict[str, type[StrategySection]]:
    """Every registered `strategy` section, by kind, in definition order."""
    return dict(_SECTIONS)


def section_class_of(data: dict[str, Any]) -> type[StrategySection]:
    """The registered section class of a `strategy` section given as a dict (by its `kind`)."""
    return _SECTIONS[data["kind"]]


def on_section_registered(rebuild: Callable[[], None]) -> None:
    """Call `rebuild` whenever a section is registered (the job schema rebuilds itself)."""
    _ON_REGISTER.append(rebuild)


__all__ = [
    "NonNegInt",
    "Section",
    "StrategyConfig",
    "StrategySection",
    "on_section_registered",
    "section_class_of",
    "strategy_sections",
]
