"""`ModelSpec` (a registered model) and `BuildConfig` (what it is built for).

Shared by the registry, the adapters and the model families; imports nothing else of
`roundhouse.models`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from roundhouse.errors import ModelError
from roundhouse.models.norms import apply_norm, check_norm

logger = logging.getLogger(__name__)

DEFAULT_FLAVOR = "debug"
TORCHVISION_PREFIX = "torchvision:"
# The example inputs of a token model (`ModelSpec.example_input`): 128 token ids, 256 of them
# (the byte vocabulary of the built-in text sources).
TOKEN_INPUT = (128,)
BYTE_VOCAB = 256


@dataclass(frozen=True)
class BuildConfig:
    """What a model is built for.

    Attributes:
        flavor: Size preset; every model has `"debug"`.
        input_shape: Shape of one sample without the batch dimension, `(C, H, W)` for images.
        num_classes: Number of output logits for classification models.
        options: Extra keyword arguments for the model's builder (e.g. `dropout`). They
            override the flavor's own values.
    """

    flavor: str = DEFAULT_FLAVOR
    input_shape: tuple[int, ...] = (1, 8, 8)
    num_classes: int = 10
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.input_shape or any(int(d) < 1 for d in self.input_shape):
            raise ModelError(
                f"input_shape must be non-empty positive sizes, got {self.input_shape!r}",
                "give the per-sample shape without the batch dimension, e.g. (1, 8, 8)",
            )
        if int(self.num_classes) < 1:
            raise ModelError(f"num_classes must be >= 1, got {self.num_classes}", None)
        # A list from YAML would make the frozen config unhashable and compare unequal.
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: Registry key.
        flavors: Flavor name -> keyword arguments for `builder`. Must include `"debug"`, a size
            that trains a step on a CPU in well under a second.
        builder: Called as `builder(input_shape=..., num_classes=..., **flavor_kwargs,
            **options)`; returns the model.
        description: One line for `roundhouse models list`.
        loss: The trainer's task. `"classification"` models map `(B, *input_shape)` to logits
            `(B, num_classes)`.
        pipeline_layers: Returns a flat list of modules whose sequential application equals
            `model.forward` (for pipeline parallelism), or None if the model has none.
        flops_per_sample: Approximate forward FLOPs of one sample (2 x multiply-adds), or None.
        takes_norm: The model takes `options.norm` (see `models/norms.py`): the CNN zoo.
        example_input: The per-sample input shape `models summary` uses when not given one:
            an 8x8 digit by default, `TOKEN_INPUT` for token models.
        example_classes: `num_classes` there (a language model's vocabulary).
    """

    name: str
    flavors: Mapping[str, Mapping[str, Any]]
    builder: Callable[..., nn.Module]
    description: str
    loss: str = "classification"
    pipeline_layers: Callable[[nn.Module], list[nn.Module]] | None = None
    flops_per_sample: Callable[[BuildConfig], int] | None = None
    takes_norm: bool = False
    example_input: tuple[int, ...] = (1, 8, 8)
    example_classes: int = 10

    def __post_init__(self) -> None:
        if DEFAULT_FLAVOR not in self.flavors:
            raise ModelError(
                f"model {self.name!r} has no {DEFAULT_FLAVOR!r} flavor",
                "every model needs a small 'debug' flavor",
            )

    def build(self, config: BuildConfig) -> nn.Module:
        """Builds the model for `config`.

        Raises:
            ModelError: The flavor is unknown (the message lists the valid ones), an option is
                not accepted by the builder (the message names it), or the model cannot take
                `config.input_shape`.
        """
        options = dict(config.options)
        norm = options.pop("norm", None) if self.takes_norm else None
        kwargs = {**self._flavor_kwargs(config.flavor), **options}
        self._check_options(options)
        if norm is not None:
            check_norm(norm, self.name)
        try:
            model = self.builder(
                input_shape=tuple(config.input_shape), num_classes=config.num_classes, **kwargs
            )
        except TypeError as err:
            if not config.options:
                raise  # no user input involved: a bug in the builder
            raise ModelError(
                f"model {self.name!r} rejected options {dict(config.options)!r}: {err}",
                "check the option names and value types in model.options",
            ) from err
        logger.debug("built %s:%s for input %s", self.name, config.flavor, config.input_shape)
        return model if norm is None else apply_norm(model, norm, self.name)

    def _flavor_kwargs(self, flavor: str) -> Mapping[str, Any]:
        if flavor not in self.flavors:
            raise ModelError(
                f"model {self.name!r} has no flavor {flavor!r}",
                f"valid flavors: {', '.join(self.flavors)}",
            )
        return self.flavors[flavor]

    def _check_options(self, options: Mapping[str, Any]) -> None:
        """Names an option the builder does not take, before anything is built."""
        params = inspect.signature(self.builder).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return  # the builder takes anything; it reports bad options itself
        extra = {"norm"} if self.takes_norm else set()
        valid = sorted((set(params) - {"input_shape", "num_classes"}) | extra)
        for option in options:
            if option not in valid:
                raise ModelError(
                    f"model {self.name!r} has no option {option!r}",
                    f"valid options: {', '.join(valid) or 'none'}",
                )
