"""ResNet (SEEDS A8): residual blocks in stages, global average pooling, one FC.

A block computes `ReLU(f(x) + shortcut(x))`. The basic block's `f` is two 3x3 convs; the
bottleneck's is 1x1 (reduce) -> 3x3 -> 1x1 (expand x4). The first block of every stage after
the first has stride 2: it halves H and W and doubles the channels, so its shortcut is a 1x1
conv with the same stride (plus batch-norm) to match shapes for the addition (S3:1168, 1174).
The stride sits on the 3x3 conv (torchvision's "v1.5").

Flavors `resnet18/34/50/101/152` have torchvision's layout and module names, so their
parameter counts and state-dict keys match `torchvision.models.resnet*` (with 1000 classes, the
last FC is 512x1000 for 18/34; on MNIST it is 512x10, SEEDS F42).

Input sizes: every conv and pool is padded and the head is an adaptive average pool, so any
input of at least 1x1 runs. The ImageNet stem (7x7/2 conv, 3/2 max-pool) divides H and W by 4
before the first stage, which leaves little of an 8x8 digit; `stem="small"` (one 3x3 stride-1
conv, no pool; the CIFAR variant) keeps the resolution. The `debug` flavor uses it, and it can
be set on any flavor with `options.stem`.
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
    image_shape,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)

STEMS = ("imagenet", "small")


def build_shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    """A 1x1 conv + BN projection when the block changes shape, else None (identity)."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),  # (B, c_out, H/s, W/s)
        nn.BatchNorm2d(c_out),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch-norm; `ReLU(f(x) + shortcut(x))`."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = build_shortcut(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, c_in, H, W)
        """Two 3x3 convolutions plus the (projected) identity: `(B, width, H/s, W/s)`."""
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, H/s, W/s)
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)  # (B, width, H/s, W/s)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), with batch-norm; `ReLU(f(x) + shortcut(x))`."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.downsample = build_shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, c_in, H, W)
        """1x1, 3x3, 1x1 convolutions plus the (projected) identity."""
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4 * width, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


def build_stem(in_channels: int, width: int, stem: str) -> list[tuple[str, nn.Module]]:
    """Named stem layers: ImageNet (7x7/2 conv + 3/2 pool, H/4) or small (3x3/1 conv, H)."""
    if stem == "imagenet":
        conv = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
    else:
        conv = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
    layers = [("conv1", conv), ("bn1", nn.BatchNorm2d(width)), ("relu", nn.ReLU())]
    if stem == "imagenet":
        layers.append(("maxpool", nn.MaxPool2d(3, stride=2, padding=1)))
    return layers


def build_stage(
    block: type[BasicBlock] | type[Bottleneck], c_in: int, width: int, depth: int, stride: int
) -> nn.Sequential:
    """`depth` blocks; the first has `stride` (and the projection shortcut if shapes change)."""
    blocks = [block(c_in, width, stride)]
    blocks += [block(width * block.expansion, width) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Sequential):
    """Stem -> `layer1..layerN` -> `avgpool` -> `flatten` -> [`dropout`] -> `fc`."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        block: type[BasicBlock] | type[Bottleneck],
        widths: Sequence[int],
        depths: Sequence[int],
        stem: str,
        dropout: float = 0.0,
    ) -> None:
        parts, c_in = build_stem(in_channels, widths[0], stem), widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            stride = 1 if i == 0 else 2  # later stages halve H and W (S3:1174)
            parts.append((f"layer{i + 1}", build_stage(block, c_in, width, depth, stride)))
            c_in = width * block.expansion
        parts += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten())]  # (B, c_in)
        parts += [("dropout", nn.Dropout(dropout))] if dropout > 0 else []
        parts.append(("fc", nn.Linear(c_in, num_classes)))  # (B, num_classes)
        super().__init__(OrderedDict(parts))


def build_resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    block: str = "basic",
    widths: Sequence[int] = (64, 128, 256, 512),
    depths: Sequence[int] = (2, 2, 2, 2),
    stem: str = "imagenet",
    dropout: float = 0.0,
) -> ResNet:
    """Builds a ResNet for `(C, H, W)` inputs of any size.

    Args:
        input_shape: `(C, H, W)`.
        num_classes: Logits out.
        block: `"basic"` (two 3x3 convs) or `"bottleneck"` (1x1-3x3-1x1, x4 channels).
        widths: Base width of each stage (the stem has `widths[0]` channels).
        depths: Number of blocks per stage.
        stem: `"imagenet"` (7x7/2 conv + max-pool) or `"small"` (3x3/1 conv, no pool).
        dropout: Dropout before the FC; 0 (ResNet has none).
    """
    c, _, _ = image_shape("resnet", input_shape)
    if block not in BLOCKS or stem not in STEMS or len(widths) != len(depths) or not widths:
        raise ModelError(
            f"resnet: bad block {block!r}, stem {stem!r} or widths/depths {widths}/{depths}",
            f"block is one of {tuple(BLOCKS)}, stem one of {STEMS}; widths and depths have "
            "one entry per stage",
        )
    model = ResNet(c, num_classes, BLOCKS[block], widths, depths, stem, check_dropout(dropout))
    return init_weights(model)


RESNET_DEPTHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

SPEC = register(
    ModelSpec(
        name="resnet",
        flavors={
            "debug": {"widths": (32, 64), "depths": (1, 1), "stem": "small"},
            **{
                name: {"block": block, "depths": depths}
                for name, (block, depths) in RESNET_DEPTHS.items()
            },
        },
        builder=build_resnet,
        description="ResNet: basic/bottleneck residual blocks with 1x1 projection shortcuts.",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("resnet"),
        takes_norm=True,
    )
)
