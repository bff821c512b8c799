"""The `single` strategy's job-file section (torch-free: `roundhouse.config` imports it).

The strategy itself is `single.py`; this module imports only pydantic and
`roundhouse.sections`, so the job schema can know the section without importing torch.
"""

from __future__ import annotations

from typing import Literal

from roundhouse.sections import StrategySection


class SingleStrategyConfig(StrategySection):
    """One device, no gradient exchange."""

    kind: Literal["single"] = "single"


__all__ = ["SingleStrategyConfig"]
