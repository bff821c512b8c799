"""VGG (SEEDS A5): a stack of VGG blocks, then three FCs with dropout.

A VGG block is `(3x3 conv, padding 1 -> ReLU) x n -> 2x2 max-pool` (S4:88-92; S3:1094): the
convs keep H and W, the pool halves them, and channels double from block to block (S3:1102).
Flavors `vgg11`, `vgg13`, `vgg16` and `vgg19` are the paper's configurations A, B, D and E;
with 1000 classes their parameter counts equal torchvision's. `batch_norm=True` adds
batch-norm after each conv (the `_bn` variants).

Input sizes: an `AdaptiveAvgPool2d(7)` sits before the classifier, as in torchvision, so the
first FC always takes 512x7x7 (on 224x224 inputs the pool does nothing). Each block halves the
size, so the five-block flavors need at least 32x32. The `debug` flavor has two narrow blocks
(8x8 -> 2x2), a 2x2 adaptive pool and a small classifier whose dropout is 0.1: at 0.5 a
64-wide layer drops so much signal that a 20-step smoke test barely learns.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from roundhouse.models.common import (
    build_fc_classifier,
    check_dropout,
    check_fits,
    image_shape,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)

# (number of convs, output channels) per block: the VGG paper's configurations A, B, D, E.
VGG_BLOCKS: dict[str, tuple[tuple[int, int], ...]] = {
    "vgg11": ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    "vgg13": ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    "vgg19": ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
}


def build_vgg_block(num_convs: int, c_in: int, c_out: int, batch_norm: bool) -> nn.Sequential:
    """`num_convs` 3x3 convs (padding 1, each followed by ReLU) then a 2x2 max-pool."""
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, kernel_size=3, padding=1))
        layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
        layers.append(nn.ReLU())  # (B, c_out, H, W)
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))  # (B, c_out, H/2, W/2)
    return nn.Sequential(*layers)


class VGG(nn.Sequential):
    """`features` (VGG blocks) -> `avgpool` (adaptive) -> `classifier`."""

    def __init__(
        self,
        in_channels: int,
        blocks: Sequence[tuple[int, int]],
        pool_size: int,
        classifier: nn.Sequential,
        batch_norm: bool = False,
    ) -> None:
        stages, c_in = [], in_channels
        for num_convs, c_out in blocks:
            stages.append(build_vgg_block(num_convs, c_in, c_out, batch_norm))
            c_in = c_out
        parts = [
            ("features", nn.Sequential(*stages)),  # (B, C_last, H / 2^n, W / 2^n)
            ("avgpool", nn.AdaptiveAvgPool2d(pool_size)),  # (B, C_last, pool_size, pool_size)
            ("classifier", classifier),
        ]
        super().__init__(OrderedDict(parts))


def build_vgg(
    input_shape: tuple[int, ...],
    num_classes: int,
    blocks: Sequence[Sequence[int]] = VGG_BLOCKS["vgg16"],
    pool_size: int = 7,
    hidden: int = 4096,
    dropout: float = 0.5,
    batch_norm: bool = False,
) -> VGG:
    """Builds a VGG network for `(C, H, W)` inputs.

    Args:
        input_shape: `(C, H, W)`.
        num_classes: Logits out.
        blocks: `(num_convs, channels)` per VGG block; each block halves H and W.
        pool_size: Side of the adaptive average pool before the classifier.
        hidden: Width of the two hidden FCs.
        dropout: Dropout after each hidden FC (0.5 in VGG).
        batch_norm: Add batch-norm after every conv.

    Raises:
        ModelError: The input is smaller than `2 ** len(blocks)`.
    """
    c, _, _ = image_shape("vgg", input_shape)
    blocks = tuple((int(n), int(ch)) for n, ch in blocks)
    dropout = check_dropout(dropout)

    def make() -> VGG:
        num_features = blocks[-1][1] * pool_size * pool_size
        classifier = build_fc_classifier(num_features, hidden, num_classes, dropout)
        return init_weights(VGG(c, blocks, pool_size, classifier, batch_norm))

    check_fits("vgg", make, input_shape)
    return make()


SPEC = register(
    ModelSpec(
        name="vgg",
        flavors={
            "debug": {"blocks": ((1, 16), (1, 32)), "pool_size": 2, "hidden": 64, "dropout": 0.1},
            **{name: {"blocks": blocks} for name, blocks in VGG_BLOCKS.items()},
            **{f"{name}_bn": {"blocks": b, "batch_norm": True} for name, b in VGG_BLOCKS.items()},
        },
        builder=build_vgg,
        description="VGG: blocks of 3x3 convs + 2x2 max-pool, two 4096 FCs with dropout.",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("vgg"),
        takes_norm=True,
    )
)
