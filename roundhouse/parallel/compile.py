"""`trainer.compile`: `torch.compile` under every strategy, names and gradient hooks unchanged.

The model is compiled in place (`nn.Module.compile`) after the strategy has set it up, so:
- parameters stay the same objects: the ring's per-parameter gradient hooks, the parameter
  server's in-place loads and the optimizer all see what they saw in eager mode;
- `state_dict()` keys get no `_orig_mod.` prefix: checkpoints of compiled and eager runs are
  interchangeable, and resume works either way.

AOTAutograd runs the whole backward as one graph, so the ring's buckets are all launched once
backward ends (correct, but no overlap with the backward's compute).

DeepSpeed uses its engine's own `compile()` (which knows ZeRO's hooks). Pipeline parallel is
not supported: its engine runs the stages' layers itself, and the job check says so.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from roundhouse.errors import TrainingError

logger = logging.getLogger(__name__)


def compile_module(model: nn.Module, mode: str) -> None:
    """`torch.compile` `model` in place (same parameters, same `state_dict` keys).

    Args:
        model: The module whose `forward` is compiled on its next call.
        mode: A `torch.compile` mode (`default`, `reduce-overhead`, `max-autotune`).
    """
    model.compile(mode=None if mode == "default" else mode)
    logger.info("torch.compile (mode=%s) of %s", mode, type(model).__name__)


def compile_engine(engine: Any, mode: str) -> None:
    """DeepSpeed's own `engine.compile()` (torch.compile of its module, ZeRO-aware).

    Raises:
        TrainingError: The installed DeepSpeed has no `engine.compile`.
    """
    if not callable(getattr(engine, "compile", None)):
        raise TrainingError(
            "trainer.compile=true, but this DeepSpeed engine has no compile()",
            "upgrade deepspeed (>= 0.14) or set trainer.compile=false",
        )
    kwargs = {} if mode == "default" else {"mode": mode}
    engine.compile(compile_kwargs=kwargs)
    logger.info("DeepSpeed engine.compile (mode=%s)", mode)


def apply_compile(strategy: Any, enabled: bool, mode: str) -> None:
    """Compile the set-up strategy's model when the job asks for it (`trainer.compile`).

    The strategy decides how (`Strategy.compile`); the loop does not know which it has.
    """
    if enabled:
        strategy.compile(mode)
