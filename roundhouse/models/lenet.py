"""LeNet (SEEDS A3): two 5x5 convs, each followed by an activation and 2x2 pooling, then FCs.

The `lenet5` flavor is d2l's LeNet: Conv(C->6, k5, p2)-Sigmoid-AvgPool(2,2)-Conv(6->16, k5)-
Sigmoid-AvgPool(2,2)-Flatten-FC(->120)-Sigmoid-FC(120->84)-Sigmoid-FC(84->classes). On 28x28
inputs the flattened features are 16x5x5 = 400, as in the notes.

Input sizes: LeNet has no global pooling, so the first FC takes whatever the conv stack leaves
(found with a meta-device forward). `lenet5` needs at least 12x12 (its second conv is
unpadded). The `debug` flavor pads both convs (5x5, padding 2), so 8x8 digits become 16x2x2.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict

from torch import nn

from roundhouse.models.common import (
    check_dropout,
    check_fits,
    get_activation,
    image_shape,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)


def build_lenet_features(
    in_channels: int, channels: tuple[int, int], conv2_padding: int, activation: str
) -> nn.Sequential:
    """The conv part: two 5x5 convs with activations, each followed by 2x2 average pooling."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),  # (B, c1, H, W)
        get_activation(activation),
        nn.AvgPool2d(kernel_size=2, stride=2),  # (B, c1, H/2, W/2)
        nn.Conv2d(c1, c2, kernel_size=5, padding=conv2_padding),
        get_activation(activation),
        nn.AvgPool2d(kernel_size=2, stride=2),  # (B, c2, H', W')
    )


def build_lenet_classifier(
    num_features: int, hidden: tuple[int, int], num_classes: int, activation: str, dropout: float
) -> nn.Sequential:
    """Flatten then FC-act-FC-act-FC; dropout (off by default) before each hidden FC's output."""
    h1, h2 = hidden
    layers: list[nn.Module] = [
        nn.Flatten(),
        nn.Linear(num_features, h1),
        get_activation(activation),
    ]
    layers += [nn.Dropout(dropout)] if dropout > 0 else []
    layers += [nn.Linear(h1, h2), get_activation(activation)]
    layers += [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(h2, num_classes))  # (B, num_classes)


class LeNet(nn.Sequential):
    """`features` (convs + pooling) then `classifier` (FCs); logits `(B, num_classes)`."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential) -> None:
        super().__init__(OrderedDict([("features", features), ("classifier", classifier)]))


def build_lenet(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: tuple[int, int] = (6, 16),
    hidden: tuple[int, int] = (120, 84),
    conv2_padding: int = 0,
    activation: str = "sigmoid",
    dropout: float = 0.0,
) -> LeNet:
    """Builds a LeNet for `(C, H, W)` inputs.

    Args:
        input_shape: `(C, H, W)`.
        num_classes: Logits out.
        channels: Output channels of the two convs.
        hidden: Widths of the two hidden FC layers.
        conv2_padding: Padding of the second conv (0 in LeNet-5; 2 keeps small inputs alive).
        activation: `sigmoid` as in LeNet; `relu` etc. also work.
        dropout: Dropout after the hidden FCs; 0 (LeNet has none).

    Raises:
        ModelError: The input is too small for the conv stack.
    """
    c, _, _ = image_shape("lenet", input_shape)
    channels, hidden, dropout = tuple(channels), tuple(hidden), check_dropout(dropout)
    features_shape = check_fits(
        "lenet",
        lambda: build_lenet_features(c, channels, conv2_padding, activation),
        input_shape,
    )
    features = build_lenet_features(c, channels, conv2_padding, activation)
    num_features = math.prod(features_shape)
    classifier = build_lenet_classifier(num_features, hidden, num_classes, activation, dropout)
    return init_weights(LeNet(features, classifier), activation)


SPEC = register(
    ModelSpec(
        name="lenet",
        flavors={
            "debug": {"conv2_padding": 2, "activation": "relu"},
            "lenet5": {},
        },
        builder=build_lenet,
        description="LeNet-5 (d2l): two 5x5 conv + 2x2 avg-pool stages, three FCs, sigmoid.",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("lenet"),
        takes_norm=True,
    )
)
