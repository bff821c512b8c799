"""The `strategy` section of the solo strategy: defining it adds `solo` to the job schema.

Like a built-in strategy's section it imports only pydantic and `roundhouse.sections`, so the
job schema can learn it without importing torch.
"""

from __future__ import annotations

from typing import Literal

from roundhouse.sections import StrategySection


class SoloStrategyConfig(StrategySection):
    """The `strategy` section of the solo strategy."""

    kind: Literal["solo"]
