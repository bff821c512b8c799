"""The CNN zoo: shapes on digits and images, input-size errors, training, pipeline layers."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch
import torchvision
from sklearn.datasets import load_digits
from torch import nn

from roundhouse.errors import ModelError
from roundhouse.models import BuildConfig, build_model, get
from roundhouse.models.summary import count_parameters

CNN_NAMES = ["alexnet", "densenet", "googlenet", "lenet", "nin", "resnet", "vgg"]
ALL_NAMES = [*CNN_NAMES, "mlp"]
ACTIVATIONS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits scaled to [0, 1], shape (N, 1, 8, 8)."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return images, torch.tensor(y)


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize(("batch", "shape"), [(4, (1, 8, 8)), (2, (3, 32, 32))])
def test_debug_flavor_forward_shape(name: str, batch: int, shape: tuple[int, ...]) -> None:
    model = build_model(name, BuildConfig(input_shape=shape, num_classes=10))
    assert model(torch.rand(batch, *shape)).shape == (batch, 10)


@pytest.mark.parametrize("name", ["resnet", "vgg", "densenet", "googlenet"])
def test_debug_flavor_runs_on_imagenet_sized_input(name: str) -> None:
    model = build_model(name, BuildConfig(input_shape=(3, 224, 224), num_classes=5)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 5)


@pytest.mark.parametrize(
    ("name", "flavor", "smallest"),
    [
        ("vgg", "vgg11", 32),  # five 2x2 pools
        ("lenet", "lenet5", 12),  # unpadded second 5x5 conv
        ("densenet", "densenet121", 29),
        ("alexnet", "alexnet", 65),
        ("nin", "nin", 67),
    ],
)
def test_too_small_input_names_model_input_and_smallest_size(
    name: str, flavor: str, smallest: int
) -> None:
    with pytest.raises(ModelError) as info:
        build_model(name, BuildConfig(flavor=flavor, input_shape=(1, 8, 8)))
    message = str(info.value)
    assert f"'{name}'" in message and "(1, 8, 8)" in message
    assert f"{smallest}x{smallest}" in message
    # The reported size is exact: it builds, one pixel less does not (meta: no memory).
    with torch.device("meta"):
        build_model(name, BuildConfig(flavor=flavor, input_shape=(1, smallest, smallest)))
        with pytest.raises(ModelError):
            build_model(name, BuildConfig(flavor=flavor, input_shape=(1, smallest - 1, 40)))


def test_resnet_accepts_tiny_inputs_with_any_stem() -> None:
    # Every conv and pool is padded and the head pools adaptively (module docstring).
    model = build_model("resnet", BuildConfig(flavor="resnet18", input_shape=(1, 8, 8)))
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_debug_flavor_learns_digits_in_20_steps(
    name: str, digits: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Acceptance: loss falls on real digits (mean of the first 3 vs the last 3 of 20 steps)."""
    images, labels = digits
    torch.manual_seed(0)
    model = build_model(name, BuildConfig(input_shape=(1, 8, 8), num_classes=10)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    losses = []
    for step in range(20):
        idx = order[step * 32 : (step + 1) * 32]
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02, losses


def _apply(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    return functools.reduce(lambda h, layer: layer(h), layers, x)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_pipeline_layers_applied_in_order_equal_forward(name: str) -> None:
    model = build_model(name, BuildConfig(input_shape=(3, 16, 16))).eval()
    layers = get(name).pipeline_layers(model)
    assert len(layers) > 3
    own = {id(m) for m in model.modules()}
    assert all(id(layer) in own for layer in layers)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(_apply(layers, x), model(x))


def test_pipeline_layers_keep_residual_blocks_whole() -> None:
    model = build_model("resnet", BuildConfig(flavor="resnet18", input_shape=(3, 32, 32)))
    kinds = [type(layer).__name__ for layer in get("resnet").pipeline_layers(model)]
    assert kinds.count("BasicBlock") == 8
    assert kinds[-1] == "Linear"


def _call_order(model: nn.Module, shape: tuple[int, ...]) -> list[nn.Module]:
    calls: list[nn.Module] = []
    tracked = (nn.Conv2d, nn.Linear, *ACTIVATIONS)
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: calls.append(mod))
        for m in model.modules()
        if isinstance(m, tracked)
    ]
    with torch.no_grad():
        model.eval()(torch.rand(2, *shape))
    for handle in handles:
        handle.remove()
    return calls


# ResNet is checked by its block structure instead: its shortcut conv runs between the last conv
# of a block and the ReLU that follows the addition, which a call-order check cannot tell apart.
@pytest.mark.parametrize("name", [n for n in CNN_NAMES if n != "resnet"])
def test_an_activation_follows_every_conv(name: str) -> None:
    """S3:942: conv is linear, so each conv's output passes an activation before the next layer."""
    calls = _call_order(build_model(name, BuildConfig(input_shape=(3, 16, 16))), (3, 16, 16))
    for current, following in itertools.pairwise(calls):
        if isinstance(current, nn.Conv2d):
            assert isinstance(following, ACTIVATIONS), (current, following)


def test_resnet_blocks_end_with_relu_after_the_addition() -> None:
    model = build_model("resnet", BuildConfig(flavor="resnet50", input_shape=(3, 32, 32)))
    for block in model.layer1:
        assert isinstance(block.relu, nn.ReLU)
    first = model.layer2[0]  # halves H, W and changes channels (S3:1168)
    assert first.downsample[0].kernel_size == (1, 1) and first.downsample[0].stride == (2, 2)
    assert first.conv2.stride == (2, 2)


@pytest.mark.parametrize(
    ("ref", "torchvision_name"),
    [
        ("resnet:resnet18", "resnet18"),
        ("resnet:resnet50", "resnet50"),
        ("vgg:vgg16", "vgg16"),
        ("vgg:vgg11_bn", "vgg11_bn"),
        ("densenet:densenet121", "densenet121"),
    ],
)
def test_real_flavors_match_torchvision_parameter_counts(ref: str, torchvision_name: str) -> None:
    name, flavor = ref.split(":")
    with torch.device("meta"):  # counts without allocating ~0.5 GB for vgg16
        ours = build_model(name, BuildConfig(flavor, (3, 224, 224), num_classes=1000))
        theirs = getattr(torchvision.models, torchvision_name)()
    assert count_parameters(ours) == count_parameters(theirs)


@pytest.mark.parametrize(
    ("ref", "gmacs"),
    [("resnet:resnet18", 1.82), ("resnet:resnet50", 4.09), ("vgg:vgg16", 15.47)],
)
def test_flops_per_sample_matches_published_multiply_adds(ref: str, gmacs: float) -> None:
    name, flavor = ref.split(":")
    flops = get(name).flops_per_sample(BuildConfig(flavor, (3, 224, 224), num_classes=1000))
    assert flops / 2 / 1e9 == pytest.approx(gmacs, rel=0.02)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_flops_per_sample_of_debug_flavor_is_positive(name: str) -> None:
    assert get(name).flops_per_sample(BuildConfig()) > 0


@pytest.mark.parametrize(
    ("name", "flavor", "dropout"),
    [("alexnet", "alexnet", 0.5), ("vgg", "vgg16", 0.5), ("nin", "nin", 0.5)],
)
def test_dropout_where_the_originals_have_it(name: str, flavor: str, dropout: float) -> None:
    with torch.device("meta"):
        model = build_model(name, BuildConfig(flavor, (3, 224, 224)))
        changed = build_model(name, BuildConfig(flavor, (3, 224, 224), options={"dropout": 0.2}))
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {dropout}
    assert {m.p for m in changed.modules() if isinstance(m, nn.Dropout)} == {0.2}


def test_googlenet_inception_keeps_height_and_width() -> None:
    """S3:1124: an Inception block changes only the channel count."""
    model = build_model("googlenet", BuildConfig(flavor="googlenet", input_shape=(3, 64, 64)))
    block = model.stage3[0]
    out = block(torch.rand(1, 192, 8, 8))
    assert out.shape == (1, 64 + 128 + 32 + 32, 8, 8)


def test_densenet_block_adds_growth_rate_channels_per_layer() -> None:
    model = build_model("densenet", BuildConfig(input_shape=(1, 8, 8)))
    block = model.features.denseblock1  # debug: 16 stem channels, 2 layers, growth 8
    assert block(torch.rand(1, 16, 8, 8)).shape == (1, 16 + 2 * 8, 8, 8)
