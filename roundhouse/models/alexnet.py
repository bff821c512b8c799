"""AlexNet (SEEDS A4): a deeper, wider LeNet with ReLU and dropout after the hidden FCs.

The `alexnet` flavor is d2l's AlexNet: 96@11x11 s4 p1, maxpool 3/2, 256@5x5 p2, maxpool 3/2,
384@3x3, 384@3x3, 256@3x3, maxpool 3/2, FC 4096 - dropout 0.5 - FC 4096 - dropout 0.5 - FC.
The overlapping 3/2 max-pooling follows S3:1027.

Input sizes: an `AdaptiveAvgPool2d(5)` sits before the classifier, so the FC input is always
256x5x5 = 6400 (on 224x224 inputs the map is already 5x5 and the pool does nothing). The
ImageNet stem (11x11 stride 4) and three unpadded pools need at least 65x65. The `debug` flavor
instead uses a 3x3 stride-1 stem and padded pools (3/2, padding 1), narrow channels and a small
classifier, so it runs on 8x8 digits (maps 8 -> 4 -> 2 -> 1). Its dropout is 0.1: at 0.5 a
64-wide layer drops so much signal that a 20-step smoke test barely learns.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from torch import nn

from roundhouse.models.common import (
    build_fc_classifier,
    check_dropout,
    check_fits,
    conv_act,
    image_shape,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)


def build_alexnet_features(
    in_channels: int,
    channels: tuple[int, int, int, int, int],
    stem: tuple[int, int, int],
    pool_padding: int,
) -> nn.Sequential:
    """Five conv layers (each with ReLU) and three overlapping max-pools.

    `stem` is the first conv's (kernel, stride, padding).
    """
    c1, c2, c3, c4, c5 = channels
    kernel, stride, padding = stem
    return nn.Sequential(
        *conv_act(in_channels, c1, kernel, stride, padding),  # (B, c1, H/s, W/s)
        nn.MaxPool2d(3, stride=2, padding=pool_padding),
        *conv_act(c1, c2, 5, padding=2),
        nn.MaxPool2d(3, stride=2, padding=pool_padding),
        *conv_act(c2, c3, 3, padding=1),
        *conv_act(c3, c4, 3, padding=1),
        *conv_act(c4, c5, 3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=pool_padding),  # (B, c5, h, w)
    )


class AlexNet(nn.Sequential):
    """`features` -> `avgpool` (adaptive) -> `classifier`; logits `(B, num_classes)`."""

    def __init__(self, features: nn.Sequential, pool_size: int, classifier: nn.Sequential) -> None:
        parts = [
            ("features", features),
            ("avgpool", nn.AdaptiveAvgPool2d(pool_size)),  # (B, C, pool_size, pool_size)
            ("classifier", classifier),
        ]
        super().__init__(OrderedDict(parts))


def build_alexnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256),
    stem: tuple[int, int, int] = (11, 4, 1),
    pool_padding: int = 0,
    pool_size: int = 5,
    hidden: int = 4096,
    dropout: float = 0.5,
) -> AlexNet:
    """Builds an AlexNet for `(C, H, W)` inputs.

    Args:
        input_shape: `(C, H, W)`.
        num_classes: Logits out.
        channels: Output channels of the five convs.
        stem: First conv's (kernel, stride, padding); `(11, 4, 1)` in AlexNet.
        pool_padding: Padding of the 3/2 max-pools (1 keeps tiny maps alive).
        pool_size: Side of the adaptive average pool before the classifier.
        hidden: Width of the two hidden FCs.
        dropout: Dropout after each hidden FC (0.5 in AlexNet).

    Raises:
        ModelError: The input is too small for the stem and pools.
    """
    c, _, _ = image_shape("alexnet", input_shape)
    channels, stem, dropout = tuple(channels), tuple(stem), check_dropout(dropout)

    def make() -> AlexNet:
        features = build_alexnet_features(c, channels, stem, pool_padding)
        num_features = channels[-1] * pool_size * pool_size
        classifier = build_fc_classifier(num_features, hidden, num_classes, dropout)
        return init_weights(AlexNet(features, pool_size, classifier))

    check_fits("alexnet", make, input_shape)
    return make()


SPEC = register(
    ModelSpec(
        name="alexnet",
        flavors={
            "debug": {
                "channels": (16, 32, 48, 48, 32),
                "stem": (3, 1, 1),
                "pool_padding": 1,
                "pool_size": 1,
                "hidden": 64,
                "dropout": 0.1,
            },
            "alexnet": {},
        },
        builder=build_alexnet,
        description="AlexNet (d2l): 5 convs + 3 max-pools, two 4096 FCs with dropout 0.5.",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("alexnet"),
        takes_norm=True,
    )
)
