"""The open `strategy` section (it lives in `roundhouse.sections`, below config, so that each
strategy package's section module can subclass it; re-exported here)."""

from __future__ import annotations

from roundhouse.sections import (
    StrategyConfig,
    StrategySection,
    on_section_registered,
    section_class_of,
    strategy_sections,
)

__all__ = [
    "StrategyConfig",
    "StrategySection",
    "on_section_registered",
    "section_class_of",
    "strategy_sections",
]
