"""The model registry: the plain-dict `MODELS` of `ModelSpec`s (`spec.py`) and its lookups.

A model family registers one `ModelSpec` when its module is imported (`roundhouse.models`
imports every family). The trainer looks a model up by name with `get(name)` and builds it with
`spec.build(BuildConfig(...))`; it never imports a family module directly.

Names are resolved in this order:

1. a registered name (`"resnet"`);
2. `"torchvision:<name>"`, a torchvision classification model (see `adapters.py`);
3. `"package.module:callable"`, a user model (see `adapters.py`).

Unknown names and flavors raise `ModelError` listing the valid ones.

Building under `with torch.device("meta"):` makes a model without allocating memory, which is
how `flops_per_sample` and shape dry-runs work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from roundhouse.errors import ModelError
from roundhouse.models import adapters
from roundhouse.models.common import flops_on_meta
from roundhouse.models.spec import DEFAULT_FLAVOR, TORCHVISION_PREFIX, BuildConfig, ModelSpec

logger = logging.getLogger(__name__)

MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Adds `spec` to `MODELS` and returns it.

    Raises:
        ModelError: Another spec already has this name.
    """
    existing = MODELS.get(spec.name)
    if existing is not None and existing is not spec:
        raise ModelError(f"model {spec.name!r} is already registered", "pick another name")
    MODELS[spec.name] = spec
    return spec


def get(name: str) -> ModelSpec:
    """Looks up a model by registered name, `torchvision:<name>` or `package.module:callable`.

    Raises:
        ModelError: The name is unknown (the message lists the registered names) or an
            adapter target cannot be imported.
    """
    if name in MODELS:
        return MODELS[name]
    if name.startswith(TORCHVISION_PREFIX):
        return adapters.get_torchvision_spec(name.removeprefix(TORCHVISION_PREFIX))
    if ":" in name:
        return adapters.get_callable_spec(name)
    raise ModelError(
        f"unknown model {name!r}",
        f"valid models: {', '.join(sorted(MODELS))}; or 'torchvision:<name>' or "
        "'package.module:callable'",
    )


def list_models() -> list[ModelSpec]:
    """All registered specs, sorted by name (adapters are not listed)."""
    return [MODELS[name] for name in sorted(MODELS)]


def build_model(name: str, config: BuildConfig) -> nn.Module:
    """Shorthand for `get(name).build(config)`."""
    return get(name).build(config)


def is_adapter_name(name: str) -> bool:
    """True for `torchvision:<name>` and `package.module:callable` (a dot before the colon)."""
    head, sep, _ = name.partition(":")
    return name.startswith(TORCHVISION_PREFIX) or (bool(sep) and "." in head)


def parse_model_ref(ref: str) -> tuple[str, str]:
    """Splits a model reference into `(name, flavor)`.

    `"resnet:resnet18"` -> `("resnet", "resnet18")`; `"resnet"` -> `("resnet", "debug")`.
    Adapter names contain a colon themselves, so for them the flavor is an optional *third*
    part: `"torchvision:resnet18"` -> `("torchvision:resnet18", "debug")`,
    `"pkg.mod:fn:default"` -> `("pkg.mod:fn", "default")`. A reference is an adapter when it
    starts with `torchvision:` or has a `.` before its first `:` (so a user module must be
    given with its package, or through `get` directly).

    Raises:
        ModelError: An empty part or too many `:`-separated parts.
    """
    parts = ref.split(":")
    num_name_parts = 2 if is_adapter_name(ref) else 1
    name_parts, flavor_parts = parts[:num_name_parts], parts[num_name_parts:]
    if len(flavor_parts) > 1 or not all(parts) or len(name_parts) < num_name_parts:
        raise ModelError(
            f"cannot parse model reference {ref!r}",
            "write NAME, NAME:FLAVOR, torchvision:NAME[:FLAVOR] or package.module:callable"
            "[:FLAVOR]",
        )
    return ":".join(name_parts), (flavor_parts[0] if flavor_parts else DEFAULT_FLAVOR)


def meta_flops(model_name: str) -> Callable[[BuildConfig], int]:
    """A `flops_per_sample` for a registered model: builds it on the meta device and counts.

    The model is looked up when the count is asked for, so a family passes this to the very
    `ModelSpec` it registers.
    """

    def flops_per_sample(config: BuildConfig) -> int:
        return flops_on_meta(get(model_name), config)

    return flops_per_sample


__all__ = [
    "DEFAULT_FLAVOR",
    "MODELS",
    "TORCHVISION_PREFIX",
    "BuildConfig",
    "ModelSpec",
    "build_model",
    "get",
    "is_adapter_name",
    "list_models",
    "meta_flops",
    "parse_model_ref",
    "register",
]
