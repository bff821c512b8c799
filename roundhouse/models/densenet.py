"""DenseNet (SEEDS A9): dense blocks joined by transition layers, GAP and one FC.

Each dense layer is `BN -> ReLU -> 1x1 conv (bn_size * k) -> BN -> ReLU -> 3x3 conv (k)` and
concatenates its `k` new channels (the growth rate) to its input, so a block of `n` layers adds
`n * k` channels. A transition (`BN -> ReLU -> 1x1 conv -> 2x2 avg-pool`) halves the channels
and H and W between blocks. The layers are pre-activation, so every conv's output passes through
BN + ReLU before the next conv or the classifier (S3:942).

Flavors `densenet121/161/169/201` have torchvision's layout and module names: parameter counts
and state-dict keys match `torchvision.models.densenet*`.

Input sizes: the ImageNet stem (7x7/2 conv, 3/2 max-pool) divides H and W by 4 and each of the
three transitions by 2 (unpadded), so the real flavors need at least 29x29. `stem="small"`
(3x3 stride-1 conv, no pool) is what the `debug` flavor uses for 8x8 digits; it can be set on
any flavor with `options.stem`. The head is an adaptive average pool, so larger inputs run.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from roundhouse.errors import ModelError
from roundhouse.models.common import (
    check_dropout,
    check_fits,
    image_shape,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)

STEMS = ("imagenet", "small")


class DenseLayer(nn.Module):
    """Bottleneck layer that appends `growth_rate` channels to its input."""

    def __init__(self, c_in: int, growth_rate: int, bn_size: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, c_in, H, W)
        """`x` with this layer's `k` new feature maps appended: `(B, c_in + k, H, W)`."""
        new = self.conv1(self.relu1(self.norm1(x)))  # (B, bn_size * k, H, W)
        new = self.dropout(self.conv2(self.relu2(self.norm2(new))))  # (B, k, H, W)
        return torch.cat([x, new], dim=1)  # (B, c_in + k, H, W)


def build_dense_block(
    c_in: int, num_layers: int, growth_rate: int, bn_size: int, dropout: float
) -> nn.Sequential:
    """`num_layers` dense layers; the output has `c_in + num_layers * growth_rate` channels."""
    layers = [
        (f"denselayer{i + 1}", DenseLayer(c_in + i * growth_rate, growth_rate, bn_size, dropout))
        for i in range(num_layers)
    ]
    return nn.Sequential(OrderedDict(layers))


def build_transition(c_in: int, c_out: int) -> nn.Sequential:
    """`BN -> ReLU -> 1x1 conv -> 2x2 avg-pool`: fewer channels, half H and W."""
    parts = [
        ("norm", nn.BatchNorm2d(c_in)),
        ("relu", nn.ReLU()),
        ("conv", nn.Conv2d(c_in, c_out, 1, bias=False)),  # (B, c_out, H, W)
        ("pool", nn.AvgPool2d(2, stride=2)),  # (B, c_out, H/2, W/2)
    ]
    return nn.Sequential(OrderedDict(parts))


def build_densenet_stem(in_channels: int, width: int, stem: str) -> list[tuple[str, nn.Module]]:
    """Named stem layers: ImageNet (7x7/2 conv + 3/2 pool, H/4) or small (3x3/1 conv)."""
    k, s, p = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
    layers = [
        ("conv0", nn.Conv2d(in_channels, width, k, stride=s, padding=p, bias=False)),
        ("norm0", nn.BatchNorm2d(width)),
        ("relu0", nn.ReLU()),
    ]
    if stem == "imagenet":
        layers.append(("pool0", nn.MaxPool2d(3, stride=2, padding=1)))
    return layers


def build_densenet_features(
    in_channels: int,
    growth_rate: int,
    block_config: Sequence[int],
    init_features: int,
    bn_size: int,
    stem: str,
    dropout: float,
) -> tuple[nn.Sequential, int]:
    """Stem, dense blocks and transitions, final BN. Returns the module and its channels."""
    parts, c = build_densenet_stem(in_channels, init_features, stem), init_features
    for i, num_layers in enumerate(block_config):
        parts.append(
            (f"denseblock{i + 1}", build_dense_block(c, num_layers, growth_rate, bn_size, dropout))
        )
        c += num_layers * growth_rate
        if i < len(block_config) - 1:
            parts.append((f"transition{i + 1}", build_transition(c, c // 2)))
            c //= 2  # compression 0.5
    parts.append(("norm5", nn.BatchNorm2d(c)))
    return nn.Sequential(OrderedDict(parts)), c


class DenseNet(nn.Sequential):
    """`features` -> `relu` -> `avgpool` -> `flatten` -> `classifier`."""

    def __init__(self, features: nn.Sequential, num_features: int, num_classes: int) -> None:
        parts = [
            ("features", features),  # (B, num_features, h, w)
            ("relu", nn.ReLU()),
            ("avgpool", nn.AdaptiveAvgPool2d(1)),  # (B, num_features, 1, 1)
            ("flatten", nn.Flatten()),  # (B, num_features)
            ("classifier", nn.Linear(num_features, num_classes)),  # (B, num_classes)
        ]
        super().__init__(OrderedDict(parts))


def build_densenet(
    input_shape: tuple[int, ...],
    num_classes: int,
    growth_rate: int = 32,
    block_config: Sequence[int] = (6, 12, 24, 16),
    init_features: int = 64,
    bn_size: int = 4,
    stem: str = "imagenet",
    dropout: float = 0.0,
) -> DenseNet:
    """Builds a DenseNet for `(C, H, W)` inputs.

    Args:
        input_shape: `(C, H, W)`.
        num_classes: Logits out.
        growth_rate: Channels each dense layer adds (k).
        block_config: Number of dense layers per block.
        init_features: Channels of the stem conv.
        bn_size: The 1x1 bottleneck conv has `bn_size * growth_rate` channels.
        stem: `"imagenet"` (7x7/2 conv + max-pool) or `"small"` (3x3/1 conv, no pool).
        dropout: Dropout after each dense layer's 3x3 conv; 0 as in the paper's ImageNet nets.

    Raises:
        ModelError: Bad stem, or an input too small for the stem and transitions.
    """
    c, _, _ = image_shape("densenet", input_shape)
    if stem not in STEMS or not block_config:
        raise ModelError(
            f"densenet: bad stem {stem!r} or block_config {block_config!r}",
            f"stem is one of {STEMS}; block_config lists the layers of each dense block",
        )
    args = (c, growth_rate, tuple(block_config), init_features, bn_size, stem)
    dropout = check_dropout(dropout)

    def make() -> DenseNet:
        features, num_features = build_densenet_features(*args, dropout)
        return init_weights(DenseNet(features, num_features, num_classes))

    check_fits("densenet", make, input_shape, hint="set options.stem='small'")
    return make()


SPEC = register(
    ModelSpec(
        name="densenet",
        flavors={
            "debug": {
                "growth_rate": 8,
                "block_config": (2, 2),
                "init_features": 16,
                "bn_size": 2,
                "stem": "small",
            },
            "densenet121": {},
            "densenet161": {
                "growth_rate": 48,
                "block_config": (6, 12, 36, 24),
                "init_features": 96,
            },
            "densenet169": {"block_config": (6, 12, 32, 32)},
            "densenet201": {"block_config": (6, 12, 48, 32)},
        },
        builder=build_densenet,
        description="DenseNet: dense blocks (BN-ReLU-conv, concatenation) and transitions.",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("densenet"),
        takes_norm=True,
    )
)
