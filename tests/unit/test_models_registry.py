"""The model registry: lookup, flavors, options, references and errors that list valid names."""

from __future__ import annotations

import pytest
from torch import nn

import roundhouse.models as models
from roundhouse.errors import ModelError
from roundhouse.models import (
    BuildConfig,
    ModelSpec,
    build_model,
    get,
    list_models,
    parse_model_ref,
    register,
)

CNN_NAMES = ["alexnet", "densenet", "googlenet", "lenet", "nin", "resnet", "vgg"]


def test_list_models_has_every_family_sorted() -> None:
    names = [spec.name for spec in list_models()]
    assert names == sorted(names)
    assert {*CNN_NAMES, "mlp"} <= set(names)


@pytest.mark.parametrize("name", [*CNN_NAMES, "mlp"])
def test_every_spec_has_debug_flavor_and_classification_loss(name: str) -> None:
    spec = get(name)
    assert "debug" in spec.flavors and len(spec.flavors) >= 2
    assert spec.loss == "classification"
    assert spec.description
    assert spec.pipeline_layers is not None and spec.flops_per_sample is not None


def test_get_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ModelError) as info:
        get("resnot")
    message = str(info.value)
    assert "'resnot'" in message
    for name in CNN_NAMES:
        assert name in message


def test_unknown_flavor_lists_valid_flavors() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet", BuildConfig(flavor="resnet9000"))
    assert "resnet9000" in str(info.value)
    assert "resnet18" in str(info.value) and "debug" in str(info.value)


def test_unknown_option_is_named_with_the_valid_ones() -> None:
    with pytest.raises(ModelError) as info:
        build_model("vgg", BuildConfig(options={"dropuot": 0.1}))
    assert "'dropuot'" in str(info.value)
    assert "dropout" in str(info.value)


def test_option_of_wrong_type_raises_model_error_naming_it() -> None:
    # `widths` must be a sequence; the builder's TypeError becomes a ModelError.
    with pytest.raises(ModelError, match="widths"):
        build_model("resnet", BuildConfig(options={"widths": 5, "depths": 1}))


@pytest.mark.parametrize("bad", [1.5, -0.1, "high"])
def test_bad_dropout_value_raises_model_error(bad: object) -> None:
    with pytest.raises(ModelError, match="dropout"):
        build_model("alexnet", BuildConfig(options={"dropout": bad}))


def test_options_override_flavor_values() -> None:
    small = build_model("resnet", BuildConfig(flavor="resnet18", options={"stem": "small"}))
    imagenet = build_model("resnet", BuildConfig(flavor="resnet18"))
    assert small.conv1.kernel_size == (3, 3) and not hasattr(small, "maxpool")
    assert imagenet.conv1.kernel_size == (7, 7) and hasattr(imagenet, "maxpool")


def test_build_model_is_get_then_build() -> None:
    config = BuildConfig(num_classes=7)
    assert type(build_model("mlp", config)) is type(get("mlp").build(config))
    assert build_model("mlp", config).head.out_features == 7


def test_build_config_validates_and_normalizes() -> None:
    assert BuildConfig(input_shape=[1, 8, 8]).input_shape == (1, 8, 8)  # e.g. from YAML
    with pytest.raises(ModelError):
        BuildConfig(input_shape=(1, 0, 8))
    with pytest.raises(ModelError):
        BuildConfig(input_shape=())
    with pytest.raises(ModelError):
        BuildConfig(num_classes=0)


def test_cnn_rejects_non_image_shape_but_mlp_takes_it() -> None:
    with pytest.raises(ModelError, match="image"):
        build_model("resnet", BuildConfig(input_shape=(64,)))
    assert build_model("mlp", BuildConfig(input_shape=(64,))).fc1.in_features == 64


def _tiny_builder(input_shape: tuple[int, ...], num_classes: int, width: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(sum(input_shape)), num_classes))


def test_register_adds_and_rejects_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.registry, "MODELS", dict(models.MODELS))
    spec = ModelSpec("tiny", {"debug": {}}, _tiny_builder, "test model")
    assert register(spec) is spec and get("tiny") is spec
    assert register(spec) is spec  # re-registering the same object is harmless
    with pytest.raises(ModelError, match="already registered"):
        register(ModelSpec("tiny", {"debug": {}}, _tiny_builder, "another"))


def test_spec_without_debug_flavor_is_rejected() -> None:
    with pytest.raises(ModelError, match="debug"):
        ModelSpec("nodebug", {"big": {}}, _tiny_builder, "no debug flavor")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("resnet", ("resnet", "debug")),
        ("resnet:resnet18", ("resnet", "resnet18")),
        ("torchvision:resnet18", ("torchvision:resnet18", "debug")),
        ("torchvision:resnet18:default", ("torchvision:resnet18", "default")),
        ("pkg.mod:make_model", ("pkg.mod:make_model", "debug")),
        ("pkg.mod:make_model:default", ("pkg.mod:make_model", "default")),
    ],
)
def test_parse_model_ref(ref: str, expected: tuple[str, str]) -> None:
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize("ref", ["", "resnet:", ":debug", "resnet:a:b", "torchvision:", "a.b:"])
def test_parse_model_ref_rejects_malformed(ref: str) -> None:
    with pytest.raises(ModelError):
        parse_model_ref(ref)
