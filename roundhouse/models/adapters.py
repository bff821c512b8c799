"""Adapters that turn outside models into `ModelSpec`s, so job files can name them.

`torchvision:<name>` builds `torchvision.models.<name>(weights=None, num_classes=...)`: random
weights, never a download. torchvision models expect 3 input channels; for any other count the
*first* `Conv2d` in module order is replaced by a fresh conv with the same kernel, stride,
padding and bias but the input's channel count (e.g. `resnet18.conv1` for 1-channel digits).
Inputs too small for the model's fixed downsampling raise `ModelError` at build time. Options
go to torchvision's builder (e.g. `dropout` for `vgg16`). Flavors: `debug` and `default`, both
the stock model.

`package.module:callable` imports `package.module` and looks up `callable`:

- If it is a `ModelSpec`, that spec is used as is (a way to ship a user model with its own
  flavors, loss and pipeline layers).
- Otherwise it is called as `callable(input_shape=..., num_classes=..., **options)` when it
  accepts those two keywords (or `**kwargs`), else as `callable(**options)`, and must return an
  `nn.Module`. A classification model must map `(B, *input_shape)` to logits `(B,
  num_classes)`. Flavors: `debug` and `default`, both plain calls.

Import failures, missing attributes and non-module results raise `ModelError`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import Any

from torch import nn

from roundhouse.errors import ModelError
from roundhouse.models.common import check_fits, flops_on_meta
from roundhouse.models.spec import TORCHVISION_PREFIX, ModelSpec

logger = logging.getLogger(__name__)

ADAPTER_FLAVORS = {"debug": {}, "default": {}}


def _torchvision_models() -> list[str]:
    import torchvision  # lazy: slow to import and only needed here

    return sorted(torchvision.models.list_models(module=torchvision.models))


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swaps the first `Conv2d` (in module order) for one taking `in_channels` channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return model
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None,
            )
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
            logger.info("replaced %s for %d input channels", name, in_channels)
            return model
    raise ModelError("the model has no Conv2d to adapt to the input channels", None)


def get_torchvision_spec(name: str) -> ModelSpec:
    """A spec building torchvision's classification model `name` with random weights.

    Raises:
        ModelError: `name` is not a torchvision classification model.
    """
    valid = _torchvision_models()
    if name not in valid:
        raise ModelError(f"unknown torchvision model {name!r}", f"valid names: {', '.join(valid)}")
    full_name = TORCHVISION_PREFIX + name

    def build(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
        import torchvision

        def make() -> nn.Module:
            model = torchvision.models.get_model(
                name, weights=None, num_classes=num_classes, **options
            )
            return replace_first_conv(model, input_shape[0]) if len(input_shape) == 3 else model

        check_fits(full_name, make, input_shape)
        return make()

    spec = ModelSpec(
        name=full_name,
        flavors=ADAPTER_FLAVORS,
        builder=build,
        description=f"torchvision.models.{name}, random weights",
    )
    return dataclasses.replace(spec, flops_per_sample=functools.partial(flops_on_meta, spec))


def _import_target(ref: str) -> object:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(
            f"cannot import {module_name!r} for model {ref!r}: {err}",
            "check the module path and that it is installed on every worker",
        ) from err
    if not hasattr(module, attr):
        raise ModelError(f"module {module_name!r} has no attribute {attr!r}", f"check {ref!r}")
    return getattr(module, attr)


def _takes_shape_kwargs(fn: Callable[..., Any]) -> bool:
    """True if `fn` accepts `input_shape` and `num_classes` by keyword (or has **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    return {"input_shape", "num_classes"} <= set(params)


def get_callable_spec(ref: str) -> ModelSpec:
    """A spec for `package.module:callable` (see the module docstring for the contract).

    Raises:
        ModelError: The module cannot be imported, or the attribute is missing or not callable.
    """
    target = _import_target(ref)
    if isinstance(target, ModelSpec):
        return target
    if not callable(target):
        raise ModelError(f"{ref!r} is not callable", "point at a function or class")
    pass_shape = _takes_shape_kwargs(target)

    def build(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
        shape_kwargs = {"input_shape": input_shape, "num_classes": num_classes}
        model = target(**(shape_kwargs if pass_shape else {}), **options)
        if not isinstance(model, nn.Module):
            raise ModelError(
                f"{ref!r} returned {type(model).__name__}, not an nn.Module",
                "return the model from the callable",
            )
        return model

    return ModelSpec(
        name=ref, flavors=ADAPTER_FLAVORS, builder=build, description=f"user model {ref}"
    )
