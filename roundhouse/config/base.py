"""The base of every job-file section (it lives in `roundhouse.sections`, below config, so that
the strategies' own section modules can build on it; re-exported here)."""

from __future__ import annotations

from roundhouse.sections import NonNegInt, Section

__all__ = ["NonNegInt", "Section"]
