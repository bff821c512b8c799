"""Adapters: `torchvision:<name>` and `package.module:callable` model references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from roundhouse.errors import ModelError
from roundhouse.models import BuildConfig, ModelSpec, build_model, get

# This module is importable under whatever name pytest gave it, so user-model references
# point here through `__name__` rather than a hard-coded path.
HERE = __name__


def make_tiny_model(input_shape: tuple[int, ...], num_classes: int, width: int = 8) -> nn.Module:
    """A user model that takes the shape keywords (the adapter's first calling convention)."""
    num_inputs = 1
    for dim in input_shape:
        num_inputs *= dim
    return nn.Sequential(
        nn.Flatten(), nn.Linear(num_inputs, width), nn.ReLU(), nn.Linear(width, num_classes)
    )


def make_fixed_model(width: int = 3) -> nn.Module:
    """A user model that takes only its own options (the second calling convention)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width))


def make_not_a_model() -> str:
    return "oops"


TINY_SPEC = ModelSpec(
    name="tiny-spec",
    flavors={"debug": {"width": 2}, "wide": {"width": 32}},
    builder=make_tiny_model,
    description="a user spec with its own flavors",
)
NOT_CALLABLE = 42


def test_torchvision_resnet18_on_digits_replaces_first_conv() -> None:
    model = build_model("torchvision:resnet18", BuildConfig(input_shape=(1, 8, 8)))
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model(torch.rand(4, 1, 8, 8)).shape == (4, 10)


def test_torchvision_resnet18_on_rgb_keeps_first_conv() -> None:
    model = build_model("torchvision:resnet18", BuildConfig("default", (3, 32, 32), 7))
    assert model.conv1.in_channels == 3
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)


def test_torchvision_conv_inside_a_container_is_replaced() -> None:
    # mobilenet_v2's first conv sits at features.0.0 (inside Conv2dNormActivation).
    model = build_model("torchvision:mobilenet_v2", BuildConfig(input_shape=(1, 32, 32)))
    assert model.features[0][0].in_channels == 1
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_torchvision_input_too_small_raises_model_error() -> None:
    with pytest.raises(ModelError, match=r"32x32"):
        build_model("torchvision:vgg11", BuildConfig(input_shape=(1, 8, 8)))


def test_torchvision_options_reach_the_builder_and_unknown_names_list_valid_ones() -> None:
    with torch.device("meta"):
        model = build_model(
            "torchvision:vgg11", BuildConfig("debug", (3, 32, 32), 10, {"dropout": 0.2})
        )
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.2}
    with pytest.raises(ModelError) as info:
        get("torchvision:resnet19")
    assert "resnet18" in str(info.value) and "resnet19" in str(info.value)


def test_torchvision_spec_has_adapter_flavors_and_flops() -> None:
    spec = get("torchvision:resnet18")
    assert set(spec.flavors) == {"debug", "default"}
    assert spec.pipeline_layers is None
    flops = spec.flops_per_sample(BuildConfig("default", (3, 224, 224), 1000))
    assert flops / 2e9 == pytest.approx(1.82, rel=0.02)


def test_callable_with_shape_keywords_gets_shape_classes_and_options() -> None:
    model = build_model(f"{HERE}:make_tiny_model", BuildConfig(options={"width": 5}))
    assert model[1].in_features == 64 and model[1].out_features == 5
    assert model(torch.rand(4, 1, 8, 8)).shape == (4, 10)


def test_callable_without_shape_keywords_gets_only_options() -> None:
    model = build_model(f"{HERE}:make_fixed_model", BuildConfig(options={"width": 4}))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 4)


def test_reference_to_a_model_spec_uses_it_as_is() -> None:
    spec = get(f"{HERE}:TINY_SPEC")
    assert spec is TINY_SPEC
    assert spec.build(BuildConfig(flavor="wide"))[1].out_features == 32


@pytest.mark.parametrize(
    ("ref", "match"),
    [
        ("no_such_package_xyz.models:build", "cannot import"),
        (f"{HERE}:missing_function", "no attribute"),
        (f"{HERE}:NOT_CALLABLE", "not callable"),
    ],
)
def test_bad_callable_references_raise_model_error(ref: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        get(ref)


def test_callable_returning_a_non_module_raises_model_error() -> None:
    with pytest.raises(ModelError, match=r"not an nn\.Module"):
        build_model(f"{HERE}:make_not_a_model", BuildConfig())


def test_torchvision_fixed_size_model_reports_why_it_cannot_take_the_input() -> None:
    # A ViT asserts its image size; no square size search can fix that, so the reason is passed on.
    with pytest.raises(ModelError, match="224"):
        build_model("torchvision:vit_b_16", BuildConfig(input_shape=(3, 32, 32)))
