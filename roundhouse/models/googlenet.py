"""GoogLeNet (SEEDS A7): a stem and three stages of Inception blocks, then GAP and one FC.

An Inception block has four parallel paths: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; 3x3 max-pool -> 1x1.
The 1x1 convs in front cut the channels the 3x3 and 5x5 convs see (S3:1128-1130). All paths
keep H and W, so the block changes only the channel count (S3:1124); the outputs are
concatenated. Every conv is followed by ReLU (S3:942). Stages end with a 3/2 max-pool that
halves H and W; the last ends with global average pooling followed by an FC (S3:1144).

The `googlenet` flavor is d2l's GoogLeNet (no batch-norm, no auxiliary heads) with the paper's
dropout 0.4 before the FC. Its stem is `7x7/2 conv, 3/2 pool, 1x1 conv, 3x3 conv, 3/2 pool`.

Input sizes: every conv and pool is padded, so any input of at least 1x1 runs. The
ImageNet stem alone divides H and W by 4, which turns 8x8 digits into 2x2 maps, so the `debug`
flavor uses `stem="small"` (`3x3 conv, 1x1 conv, 3x3 conv`, all stride 1), keeps the first
Inception block of each stage, divides every width by 4 and uses dropout 0.1 (0.4 slows a
20-step smoke test down markedly).
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
    conv_act,
    image_shape,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)

# An Inception block's widths: (1x1, (3x3 reduce, 3x3), (5x5 reduce, 5x5), pool projection).
InceptionWidths = tuple[int, tuple[int, int], tuple[int, int], int]

# d2l / paper widths of the three Inception stages (3a-3b, 4a-4e, 5a-5b).
GOOGLENET_STAGES: tuple[tuple[InceptionWidths, ...], ...] = (
    ((64, (96, 128), (16, 32), 32), (128, (128, 192), (32, 96), 64)),
    (
        (192, (96, 208), (16, 48), 64),
        (160, (112, 224), (24, 64), 64),
        (128, (128, 256), (24, 64), 64),
        (112, (144, 288), (32, 64), 64),
        (256, (160, 320), (32, 128), 128),
    ),
    ((256, (160, 320), (32, 128), 128), (384, (192, 384), (48, 128), 128)),
)
STEM_WIDTHS = (64, 64, 192)
STEMS = ("imagenet", "small")


class Inception(nn.Module):
    """Four parallel paths concatenated along channels; H and W are unchanged."""

    def __init__(self, c_in: int, widths: InceptionWidths) -> None:
        super().__init__()
        c1, (c2_red, c2), (c3_red, c3), c4 = widths
        self.path1 = nn.Sequential(*conv_act(c_in, c1, 1))
        self.path2 = nn.Sequential(*conv_act(c_in, c2_red, 1), *conv_act(c2_red, c2, 3, padding=1))
        self.path3 = nn.Sequential(*conv_act(c_in, c3_red, 1), *conv_act(c3_red, c3, 5, padding=2))
        self.path4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *conv_act(c_in, c4, 1))
        self.out_channels = c1 + c2 + c3 + c4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, c_in, H, W)
        """The four paths' feature maps, concatenated: `(B, c1 + c2 + c3 + c4, H, W)`."""
        paths = (self.path1, self.path2, self.path3, self.path4)
        return torch.cat([path(x) for path in paths], dim=1)  # (B, c1 + c2 + c3 + c4, H, W)


def build_googlenet_stem(
    in_channels: int, widths: tuple[int, int, int], stem: str
) -> nn.Sequential:
    """The ImageNet stem (H/4) or the small stem (stride 1) for tiny inputs."""
    w0, w1, w2 = widths
    if stem == "imagenet":
        return nn.Sequential(
            *conv_act(in_channels, w0, 7, stride=2, padding=3),  # (B, w0, H/2, W/2)
            nn.MaxPool2d(3, stride=2, padding=1),  # (B, w0, H/4, W/4)
            *conv_act(w0, w1, 1),
            *conv_act(w1, w2, 3, padding=1),
            nn.MaxPool2d(3, stride=2, padding=1),  # (B, w2, H/8, W/8)
        )
    return nn.Sequential(
        *conv_act(in_channels, w0, 3, padding=1),  # (B, w0, H, W)
        *conv_act(w0, w1, 1),
        *conv_act(w1, w2, 3, padding=1),
    )


def build_inception_stages(
    c_in: int, stages: Sequence[Sequence[InceptionWidths]]
) -> tuple[list[nn.Sequential], int]:
    """Stages of Inception blocks; all but the last end with a 3/2 max-pool (halves H, W)."""
    built = []
    for i, stage in enumerate(stages):
        blocks: list[nn.Module] = []
        for widths in stage:
            blocks.append(Inception(c_in, widths))
            c_in = blocks[-1].out_channels
        if i < len(stages) - 1:
            blocks.append(nn.MaxPool2d(3, stride=2, padding=1))
        built.append(nn.Sequential(*blocks))
    return built, c_in


class GoogLeNet(nn.Sequential):
    """`stem` -> Inception stages -> GAP -> dropout -> `fc`; logits `(B, num_classes)`."""

    def __init__(self, stem: nn.Sequential, stages: list[nn.Sequential], head: nn.Sequential):
        parts = [("stem", stem)]
        parts += [(f"stage{i + 3}", stage) for i, stage in enumerate(stages)]
        super().__init__(OrderedDict([*parts, ("head", head)]))


def scale_widths(widths: InceptionWidths, div: int) -> InceptionWidths:
    """Divides every width of an Inception block by `div` (at least 1 channel each)."""

    def s(c: int) -> int:
        return max(1, round(c / div))

    c1, (c2r, c2), (c3r, c3), c4 = widths
    return (s(c1), (s(c2r), s(c2)), (s(c3r), s(c3)), s(c4))


def build_googlenet(
    input_shape: tuple[int, ...],
    num_classes: int,
    stem: str = "imagenet",
    blocks_per_stage: tuple[int, int, int] = (2, 5, 2),
    width_div: int = 1,
    dropout: float = 0.4,
) -> GoogLeNet:
    """Builds a GoogLeNet for `(C, H, W)` inputs.

    Args:
        input_shape: `(C, H, W)`.
        num_classes: Logits out.
        stem: `"imagenet"` (7x7/2 conv and two 3/2 pools) or `"small"` (stride 1).
        blocks_per_stage: How many of each stage's Inception blocks to keep (at most 2, 5, 2).
        width_div: Divide every channel count by this (1 is the real network).
        dropout: Dropout before the FC (0.4 in the paper).
    """
    c, _, _ = image_shape("googlenet", input_shape)
    if stem not in STEMS or len(blocks_per_stage) != 3:
        raise ModelError(
            f"googlenet: bad stem {stem!r} or blocks_per_stage {blocks_per_stage!r}",
            f"stem is one of {STEMS}; blocks_per_stage has three counts",
        )
    stages = [
        [scale_widths(w, width_div) for w in stage[:n]]
        for stage, n in zip(GOOGLENET_STAGES, blocks_per_stage, strict=True)
    ]
    stem_widths = tuple(max(1, w // width_div) for w in STEM_WIDTHS)
    dropout = check_dropout(dropout)

    def make() -> GoogLeNet:
        built, c_out = build_inception_stages(stem_widths[-1], stages)
        head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),  # (B, c_out, 1, 1)
            nn.Flatten(),  # (B, c_out)
            nn.Dropout(dropout),
            nn.Linear(c_out, num_classes),  # (B, num_classes)
        )
        return init_weights(GoogLeNet(build_googlenet_stem(c, stem_widths, stem), built, head))

    check_fits("googlenet", make, input_shape)
    return make()


SPEC = register(
    ModelSpec(
        name="googlenet",
        flavors={
            "debug": {
                "stem": "small",
                "blocks_per_stage": (1, 1, 1),
                "width_div": 4,
                "dropout": 0.1,
            },
            "googlenet": {},
        },
        builder=build_googlenet,
        description="GoogLeNet (d2l, no aux heads): Inception blocks in 3 stages, GAP + FC.",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("googlenet"),
        takes_norm=True,
    )
)
