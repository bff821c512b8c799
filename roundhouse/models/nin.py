"""NiN, Network in Network (SEEDS A6): NiN blocks and global average pooling, no FC layers.

A NiN block is one conv + ReLU followed by two 1x1 convs + ReLU, which act as a per-pixel FC
layer (S4:96; S3:1108). The last block outputs `num_classes` channels; global average pooling
and flatten turn them into the logits (S3:1112). As in d2l the last block keeps its ReLUs
(an activation after every conv, S3:942), so the logits are non-negative.

The `nin` flavor is d2l's NiN: block(96, 11x11 s4), maxpool 3/2, block(256, 5x5 p2),
maxpool 3/2, block(384, 3x3 p1), maxpool 3/2, dropout 0.5, block(num_classes, 3x3 p1), GAP.
It needs at least 67x67 inputs. The `debug` flavor uses a 3x3 stride-1 first block, padded
pools (3/2, padding 1) and narrow channels, so it runs on 8x8 digits.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from torch import nn

from roundhouse.models.common import (
    check_dropout,
    check_fits,
    conv_act,
    image_shape,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)


def build_nin_block(
    c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0
) -> nn.Sequential:
    """`conv(kernel) -> ReLU -> 1x1 conv -> ReLU -> 1x1 conv -> ReLU`, all `c_out` wide."""
    return nn.Sequential(
        *conv_act(c_in, c_out, kernel, stride, padding),  # (B, c_out, H', W')
        *conv_act(c_out, c_out, 1),
        *conv_act(c_out, c_out, 1),
    )


class NiN(nn.Sequential):
    """Three NiN blocks with max-pools, dropout, a class-channel block and global pooling."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: tuple[int, int, int],
        stem: tuple[int, int, int],
        pool_padding: int,
        dropout: float,
    ) -> None:
        c1, c2, c3 = channels
        parts = [
            ("block1", build_nin_block(in_channels, c1, *stem)),  # (B, c1, H/s, W/s)
            ("pool1", nn.MaxPool2d(3, stride=2, padding=pool_padding)),
            ("block2", build_nin_block(c1, c2, 5, padding=2)),
            ("pool2", nn.MaxPool2d(3, stride=2, padding=pool_padding)),
            ("block3", build_nin_block(c2, c3, 3, padding=1)),
            ("pool3", nn.MaxPool2d(3, stride=2, padding=pool_padding)),
            ("dropout", nn.Dropout(dropout)),
            ("block4", build_nin_block(c3, num_classes, 3, padding=1)),  # (B, classes, h, w)
            ("gap", nn.AdaptiveAvgPool2d(1)),  # (B, num_classes, 1, 1)
            ("flatten", nn.Flatten()),  # (B, num_classes)
        ]
        super().__init__(OrderedDict(parts))


def build_nin(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: tuple[int, int, int] = (96, 256, 384),
    stem: tuple[int, int, int] = (11, 4, 0),
    pool_padding: int = 0,
    dropout: float = 0.5,
) -> NiN:
    """Builds a NiN for `(C, H, W)` inputs.

    Args:
        input_shape: `(C, H, W)`.
        num_classes: Output channels of the last block = logits.
        channels: Widths of the first three blocks.
        stem: First block's conv (kernel, stride, padding); `(11, 4, 0)` in NiN.
        pool_padding: Padding of the 3/2 max-pools (1 keeps tiny maps alive).
        dropout: Dropout before the last block (0.5 in d2l).

    Raises:
        ModelError: The input is too small for the stem and pools.
    """
    c, _, _ = image_shape("nin", input_shape)
    channels, stem, dropout = tuple(channels), tuple(stem), check_dropout(dropout)

    def make() -> NiN:
        return init_weights(NiN(c, num_classes, channels, stem, pool_padding, dropout))

    check_fits("nin", make, input_shape)
    return make()


SPEC = register(
    ModelSpec(
        name="nin",
        flavors={
            "debug": {"channels": (16, 32, 48), "stem": (3, 1, 1), "pool_padding": 1},
            "nin": {},
        },
        builder=build_nin,
        description="Network in Network (d2l): NiN blocks with 1x1 convs, global average pool.",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("nin"),
        takes_norm=True,
    )
)
