"""Parameter counts and output sizes: the worked examples of SEEDS §F (rows F1-F13, F42).

Where the notes err (SEEDS §H), the tests use the correct value and say so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from roundhouse import models
from roundhouse.models import BuildConfig, build_model
from roundhouse.models.summary import (
    conv_output_size,
    conv_params,
    count_parameters,
    estimate_flops,
    fc_params,
    format_summary,
    same_padding,
    summarize,
)


def _linear_count(n_in: int, n_out: int) -> int:
    with torch.device("meta"):  # a 10000x10000 layer would otherwise allocate 400 MB
        return count_parameters(nn.Linear(n_in, n_out))


@pytest.mark.parametrize(
    ("seed", "n_in", "n_out", "expected"),
    [
        ("F1 S0:95-96", 100, 1000, 101_000),
        ("F2 S0:97-98", 1000, 1000, 1_001_000),
        ("F3 S0:99-100", 1000, 10, 10_010),
        ("F5 S0:109", 1000, 10000, 10_010_000),
        ("F6 S0:110", 10000, 10000, 100_010_000),
    ],
)
def test_fc_params_seeds_f1_to_f6(seed: str, n_in: int, n_out: int, expected: int) -> None:
    """FC layer: n_in * n_out weights + n_out biases (S0:76-85)."""
    assert fc_params(n_in, n_out) == expected, seed
    assert _linear_count(n_in, n_out) == expected, seed


def test_f6_two_10000_wide_layers_exceed_1e8_s0_112() -> None:
    total = fc_params(1000, 10000) + fc_params(10000, 10000)
    assert total == 110_020_000 and total > 1e8


def test_f4_mlp_100_1000_1000_10_has_1_112_010_params_s0_101() -> None:
    """The notes write "≈"; the count is exact (S0:101).

    Their "3 layers each 1000 neurons" (S0:91) is 1000-1000-10: the last layer has 10 (SEEDS H6).
    """
    model = build_model(
        "mlp", BuildConfig(input_shape=(100,), options={"hidden_sizes": (1000, 1000)})
    )
    assert count_parameters(model) == 1_112_010
    assert fc_params(100, 1000) + fc_params(1000, 1000) + fc_params(1000, 10) == 1_112_010


def test_f7_conv_10_filters_5x5_on_32x32x3_s2_54_70() -> None:
    """76 params per filter, 760 in all, and the output is 32x32x10.

    The notes compute the output as (5 + 2*2 - 5)/1 + 1 = 5 (S2:63); the correct value for a
    32-wide input is (32 + 4 - 5)/1 + 1 = 32 (SEEDS H1).
    """
    assert conv_params(3, 1, 5) == 5 * 5 * 3 + 1 == 76
    assert conv_params(3, 10, 5) == 760
    conv = nn.Conv2d(3, 10, kernel_size=5, stride=1, padding=2)
    assert count_parameters(conv) == 760
    assert conv_output_size(32, k=5, stride=1, padding=2) == 32
    rows = summarize(conv, (3, 32, 32))
    assert [(r.kind, r.output_shape, r.num_params) for r in rows] == [("Conv2d", (10, 32, 32), 760)]


def test_f8_conv_stack_shapes_s2_102_112() -> None:
    """28x28x1 -> conv3 26x26x25 -> pool 13x13x25 -> conv3 11x11x50 -> pool 5x5x50 -> 1250."""
    model = nn.Sequential(
        nn.Conv2d(1, 25, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(25, 50, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),  # floors 11/2: the last row and column are dropped
        nn.Flatten(),
    )
    rows = summarize(model, (1, 28, 28))
    shapes = [r.output_shape for r in rows if r.kind != "ReLU"]
    assert shapes == [(25, 26, 26), (25, 13, 13), (50, 11, 11), (50, 5, 5), (1250,)]
    params = [r.num_params for r in rows if r.kind == "Conv2d"]
    assert params == [3 * 3 * 1 * 25 + 25, 3 * 3 * 25 * 50 + 50] == [250, 11_300]


def test_f9_rgb_input_64_filters_3x3_s3_863() -> None:
    assert conv_params(3, 64, 3, bias=False) == 1728
    conv = nn.Conv2d(3, 64, 3)
    assert conv.weight.numel() == 1728 and conv.bias.numel() == 64


def test_f10_two_conv_stack_on_28x28_s1_121_126() -> None:
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.Conv2d(20, 64, 5), nn.ReLU())
    rows = [r for r in summarize(model, (1, 28, 28)) if r.kind == "Conv2d"]
    assert [r.output_shape for r in rows] == [(20, 24, 24), (64, 20, 20)]
    assert [r.num_params for r in rows] == [520, 32_064]
    assert conv_params(1, 20, 5) == 520 and conv_params(20, 64, 5) == 32_064


def test_f11_output_size_can_be_non_integer_s3_956_s2_47() -> None:
    """7x7, k3, s3, p0 gives 2.33: the kernel does not tile the image, so padding is needed."""
    size = conv_output_size(7, k=3, stride=3, padding=0)
    assert size == pytest.approx(7 / 3) and not size.is_integer()
    out = nn.Conv2d(1, 1, 3, stride=3)(torch.rand(1, 1, 7, 7))
    assert out.shape[-1] == 2  # PyTorch floors, leaving the last column unseen
    assert conv_output_size(7, k=3, stride=3, padding=1) == 3  # padding makes it tile


@pytest.mark.parametrize(("k", "per_side"), [(3, 1), (5, 2), (7, 3)])
def test_f12_same_padding_keeps_h_and_w_s3_962_976(k: int, per_side: int) -> None:
    """The notes' p = k - 1 is the *total* padding (SEEDS H10); per side it is (k - 1) / 2."""
    assert same_padding(k) == per_side and 2 * per_side == k - 1
    assert conv_output_size(28, k, stride=1, padding=per_side) == 28
    conv = nn.Conv2d(2, 2, k, padding=same_padding(k))
    assert conv(torch.rand(1, 2, 28, 28)).shape[-2:] == (28, 28)


def test_f12_even_kernel_has_no_symmetric_same_padding_s3_978() -> None:
    with pytest.raises(ValueError, match="even"):
        same_padding(4)


def test_f13_pooling_2x2_stride_2_s2_107_109() -> None:
    assert conv_output_size(26, k=2, stride=2) == 13
    assert conv_output_size(11, k=2, stride=2) == 5.5  # floored to 5 by PyTorch
    pool = nn.MaxPool2d(2, 2)
    assert pool(torch.rand(1, 1, 26, 26)).shape[-1] == 13
    assert pool(torch.rand(1, 1, 11, 11)).shape[-1] == 5
    assert count_parameters(pool) == 0  # max pooling has no parameters (S2:82)


def test_f42_resnet18_on_mnist_last_fc_is_512x10_s3_1348() -> None:
    model = build_model("resnet", BuildConfig("resnet18", (1, 28, 28), num_classes=10))
    assert (model.fc.in_features, model.fc.out_features) == (512, 10)
    assert count_parameters(model.fc) == fc_params(512, 10) == 5130
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "lenet", "alexnet", "vgg", "nin", "googlenet", "resnet"])
def test_summary_rows_sum_to_count_parameters(name: str) -> None:
    model = build_model(name, BuildConfig(input_shape=(1, 8, 8)))
    rows = summarize(model, (1, 8, 8))
    assert sum(r.num_params for r in rows) == count_parameters(model)
    assert rows[-1].output_shape == (10,)


def test_summary_restores_training_mode_and_counts_each_module_once() -> None:
    model = build_model("densenet", BuildConfig(input_shape=(1, 8, 8))).train()
    model.features.norm0.eval()  # a mixed state must come back as it was
    rows = summarize(model, (1, 8, 8))
    assert model.training and not model.features.norm0.training
    assert model.features.conv0.training
    assert sum(r.num_params for r in rows) == count_parameters(model)
    names = [r.name for r in rows]
    assert "features.denseblock1.denselayer1.conv1" in names


def test_summary_of_a_meta_model_costs_nothing() -> None:
    with torch.device("meta"):
        model = build_model("resnet", BuildConfig("resnet152", (3, 224, 224), 1000))
    rows = summarize(model, (3, 224, 224))
    assert sum(r.num_params for r in rows) == count_parameters(model) == 60_192_808


def test_count_parameters_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 15 + 8
    assert count_parameters(model, trainable_only=True) == 8


def test_format_summary_lists_rows_and_total() -> None:
    model = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.Flatten(), nn.Linear(20 * 24 * 24, 10))
    rows = summarize(model, (1, 28, 28))
    text = format_summary(rows, count_parameters(model))
    lines = text.splitlines()
    assert lines[0].split() == ["Layer", "Kind", "Output", "shape", "Params"]
    assert len(lines) == len(rows) + 4
    assert "20x24x24" in text and "520" in text
    assert lines[-1] == f"Total params: {count_parameters(model):,}"


def test_estimate_flops_is_two_times_multiply_adds() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 10))
    macs = 8 * 8 * 2 * (1 * 3 * 3) + 128 * 10
    assert estimate_flops(model, (1, 8, 8)) == 2 * macs


NEEDS_A_RUN = {"ldm"}  # its latent space is a trained VAE's (model.options.vae_checkpoint)


@pytest.mark.parametrize(
    "name", sorted(s.name for s in models.list_models() if s.name not in NEEDS_A_RUN)
)
def test_every_zoo_model_summarizes_on_its_own_example_input(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`models summary NAME` with no --input: token models get 128 token ids, images a digit."""
    from roundhouse.launch.cli import main

    assert main(["models", "summary", name]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    token = models.get(name).example_input == (128,)
    assert ("(128,)" in first) == token and ("(1, 8, 8)" in first) != token
