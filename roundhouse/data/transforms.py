"""Training-time augmentation (torchvision.transforms.v2) and batch-level mixup.

Every random choice is a pure function of (seed, epoch, sample index) or (seed, epoch, step), so
an augmented batch does not depend on the world size, the number of loader workers or where a
run resumed. Inputs are float images in [0, 1]; transforms that can leave that range (noise,
colour jitter) clamp back into it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from roundhouse.config import AugmentConfig
from roundhouse.errors import DataError

from .sampler import AUGMENT_STREAM, MIXUP_STREAM, derive_seed

logger = logging.getLogger(__name__)

Transform = Callable[[Tensor], Tensor]


def _geometric(v2: Any, config: AugmentConfig, height: int, width: int) -> list[Transform]:
    steps: list[Transform] = []
    if config.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=config.hflip))
    if config.rotation > 0 or config.translate > 0 or config.scale is not None:
        steps.append(
            v2.RandomAffine(
                degrees=config.rotation,
                translate=(config.translate, config.translate) if config.translate > 0 else None,
                scale=config.scale,
                # Bilinear keeps small (8x8) images from turning blocky when rotated.
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if config.random_crop_padding > 0:
        steps.append(v2.RandomCrop((height, width), padding=config.random_crop_padding))
    return steps


def _photometric(v2: Any, config: AugmentConfig, num_channels: int) -> list[Transform]:
    steps: list[Transform] = []
    if config.color_jitter > 0:
        strength = config.color_jitter
        # Saturation needs RGB; on grey or other channel counts only brightness and contrast
        # have a meaning.
        saturation = strength if num_channels == 3 else 0.0
        steps.append(v2.ColorJitter(brightness=strength, contrast=strength, saturation=saturation))
    if config.gaussian_noise > 0:
        steps.append(v2.GaussianNoise(sigma=config.gaussian_noise, clip=True))
    if config.random_erasing > 0:
        steps.append(v2.RandomErasing(p=config.random_erasing, value=0.0))
    return steps


def build_augmentation(config: AugmentConfig, input_shape: Sequence[int]) -> Transform | None:
    """Builds the per-sample training augmentation described by `config`.

    Order: flip, affine (rotation/translate/scale), padded random crop, colour jitter, Gaussian
    noise, random erasing (cutout). `config.mixup_alpha` is batch-level and handled by the
    loader, not here.

    Args:
        config: The job's `data.augment` section.
        input_shape: Per-sample shape `(C, H, W)`.

    Returns:
        A callable mapping a `(C, H, W)` float tensor to one of the same shape, or None when
        every per-sample augmentation is off.

    Raises:
        DataError: If an augmentation is on but samples are not `(C, H, W)` images.
    """
    enabled = any(
        (
            config.hflip,
            config.rotation,
            config.translate,
            config.scale,
            config.random_crop_padding,
            config.color_jitter,
            config.gaussian_noise,
            config.random_erasing,
        )
    )
    if not enabled:
        return None
    if len(input_shape) != 3:
        raise DataError(
            f"image augmentation needs (C, H, W) samples, got shape {tuple(input_shape)}",
            "turn data.augment off for this source",
        )
    # torchvision is imported here, not at module level: it costs ~1.2 s (it pulls in
    # torch._dynamo), which every driver and worker would pay for jobs without augmentation.
    from torchvision.transforms import v2

    channels, height, width = input_shape
    steps = _geometric(v2, config, height, width) + _photometric(v2, config, channels)
    logger.debug("augmentation: %s", steps)
    return v2.Compose(steps)


def augment_batch(
    transform: Transform, images: Tensor, indices: Sequence[int], *, seed: int, epoch: int
) -> Tensor:
    """Applies `transform` to each image with randomness seeded by (seed, epoch, index).

    Args:
        transform: A per-sample transform from `build_augmentation`.
        images: `(B, C, H, W)` images (not modified).
        indices: Dataset index of each image; it, not the position in the batch, picks the seed.
        seed: Run seed.
        epoch: Epoch number.

    Returns:
        The `(B, C, H, W)` augmented images.
    """
    # fork_rng keeps the caller's global RNG stream untouched by the per-sample reseeding.
    with torch.random.fork_rng(devices=[]):
        out = []
        for image, index in zip(images, indices, strict=True):
            torch.manual_seed(derive_seed(seed, epoch, int(index), AUGMENT_STREAM))
            out.append(transform(image))
    return torch.stack(out)


@dataclass(frozen=True)
class MixupDraw:
    """The mixup choice for one global step.

    Attributes:
        lam: Weight of the original sample, drawn from Beta(alpha, alpha).
        partners: `partners[j]` is the position (within the global batch) of the sample mixed
            into position `j`.
    """

    lam: float
    partners: Tensor


def draw_mixup(alpha: float, step_size: int, *, seed: int, epoch: int, step: int) -> MixupDraw:
    """Draws lam and the partner permutation of one global step.

    Pairing happens over the whole global batch (not per rank), so a mixed step is the same at
    any world size; each rank fetches its samples' partners itself.
    """
    if alpha <= 0:
        raise DataError(f"mixup alpha must be positive, got {alpha}")
    rng = np.random.default_rng(derive_seed(seed, epoch, step, MIXUP_STREAM))
    lam = float(rng.beta(alpha, alpha))
    partners = torch.from_numpy(rng.permutation(step_size)).long()
    return MixupDraw(lam=lam, partners=partners)


def apply_mixup(
    batch: dict[str, Tensor], partner: dict[str, Tensor], lam: float
) -> dict[str, Tensor]:
    """Mixes `partner` into `batch`.

    Returns:
        `{"input": lam * x + (1 - lam) * x_b, "target": y, "target_b": y_b, "mix_lam": lam}`;
        the trainer's loss is `lam * L(out, target) + (1 - lam) * L(out, target_b)`.
    """
    mixed = batch["input"] * lam + partner["input"] * (1.0 - lam)
    return {
        "input": mixed,
        "target": batch["target"],
        "target_b": partner["target"],
        "mix_lam": torch.tensor(lam, dtype=torch.float32),
    }


# --- input normalization (data.normalize) ---------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InputNormalizer:
    """`(x - mean) / std` per channel of `(B, C, ...)` inputs, as a forward pre-hook.

    Registered on the model (`model.register_forward_pre_hook`), so it runs after augmentation
    on every path that feeds the model (training, evaluation, export, sampling) and travels
    into the exported ONNX graph; the model's state dict is unchanged.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def normalize(self, x: Tensor) -> Tensor:
        """`x` normalized along dimension 1."""
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def __call__(self, module: Any, args: tuple) -> tuple:
        """The forward pre-hook: the first positional input normalized."""
        return (self.normalize(args[0]), *args[1:])


def resolve_normalize(value: Any, num_channels: int) -> tuple[tuple, tuple] | None:
    """`(mean, std)` for `data.normalize` (`imagenet`, `{mean, std}`, `none`/None: None).

    Raises:
        DataError: the values do not have one entry per input channel.
    """
    if value is None or value == "none":
        return None
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if value == "imagenet" else (value.mean, value.std)
    if len(mean) != num_channels:
        raise DataError(
            f"data.normalize has {len(mean)} channel values, the inputs have {num_channels} "
            "channels",
            "give one mean and std per input channel, or remove data.normalize",
        )
    return tuple(mean), tuple(std)
