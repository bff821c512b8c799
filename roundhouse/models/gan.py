"""DCGAN: a generator and a discriminator for small images (SEEDS A21: S3:2231-2348, S2:132-138).

The generator maps noise `z ~ N(0, I)` to an image: a linear layer to a 4x4 feature map, then
transposed convolutions that double the size (batch norm and ReLU between them), and a 3x3
convolution with tanh to the image channels. The discriminator is a CNN that outputs one
scalar per image, higher meaning "more real": strided 4x4 convolutions with LeakyReLU(0.2)
halve the size down to 4x4, then a linear layer. `spectral_norm: true` wraps every
discriminator weight in spectral normalization (a Lipschitz bound that steadies training,
SEEDS S1:434); otherwise the discriminator uses batch norm after its first layer, as DCGAN.

Images are in [0, 1] at the model's boundary (as the data pipeline gives them): the generator
returns `(tanh + 1) / 2`, the discriminator scales its input to [-1, 1]. `forward(x)` is the
discriminator's logit `(B,)`; the `gan` task (roundhouse/trainer/tasks_gan.py) calls
`generator` and `discriminator` itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError
from roundhouse.models.common import image_shape
from roundhouse.models.registry import register
from roundhouse.models.spec import ModelSpec


def num_doublings(size: int) -> int:
    """How many 2x steps lead from 4x4 to `size` (a power of two >= 8)."""
    steps = round(math.log2(size / 4)) if size >= 8 else 0
    if size < 8 or 4 * 2**steps != size:
        raise ModelError(
            f"dcgan needs square images of side 8, 16, 32, ... (got {size})",
            "set data.image_size to a power of two >= 8 (the digits: 8 or 16)",
        )
    return steps


class Generator(nn.Module):
    """`z (B, latent_dim)` -> images `(B, C, H, W)` in [0, 1]."""

    def __init__(self, image: tuple[int, int, int], latent_dim: int, channels: int) -> None:
        super().__init__()
        c, h, _ = image
        steps = num_doublings(h)
        self.latent_dim = latent_dim
        width = channels * 2 ** (steps - 1) if steps else channels
        self.project = nn.Sequential(
            nn.Linear(latent_dim, width * 16, bias=False), nn.BatchNorm1d(width * 16), nn.ReLU()
        )
        self.width = width
        layers: list[nn.Module] = []
        for _ in range(steps):
            out = max(width // 2, channels)
            layers += [
                nn.ConvTranspose2d(width, out, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            width = out
        self.upsample = nn.Sequential(*layers)
        self.to_image = nn.Conv2d(width, c, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Images in [0, 1] for noise `z`."""
        x = self.project(z).view(z.shape[0], self.width, 4, 4)  # (B, W, 4, 4)
        x = self.upsample(x)  # (B, channels, H, W)
        return (torch.tanh(self.to_image(x)) + 1) / 2  # (B, C, H, W)


class MinibatchStd(nn.Module):
    """Appends one channel: the mean over features of the standard deviation across the batch
    (ProGAN's minibatch standard deviation). A generator that draws every sample alike gives
    itself away by a small value, so D can punish low diversity (mode collapse, S3:2283-2289).
    """

    def forward(self, x: Tensor) -> Tensor:
        """`(B, C, H, W)` -> `(B, C + 1, H, W)`."""
        std = x.float().var(dim=0, unbiased=False).add(1e-8).sqrt().mean()  # one sample: 1e-4
        return torch.cat([x, std.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])], dim=1)


class Discriminator(nn.Module):
    """Images `(B, C, H, W)` in [0, 1] -> realness logits `(B,)`."""

    def __init__(
        self,
        image: tuple[int, int, int],
        channels: int,
        spectral_norm: bool,
        minibatch_std: bool = False,
    ) -> None:
        super().__init__()
        c, h, _ = image
        steps = num_doublings(h)
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers: list[nn.Module] = []
        width_in, width = c, channels
        for i in range(steps):
            layers.append(sn(nn.Conv2d(width_in, width, 4, stride=2, padding=1)))
            if i > 0 and not spectral_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.LeakyReLU(0.2))
            width_in, width = width, width * 2
        if minibatch_std:
            layers.append(MinibatchStd())
            width_in += 1
        self.features = nn.Sequential(*layers)
        self.head = sn(nn.Linear(width_in * 16, 1))

    def forward(self, x: Tensor) -> Tensor:
        """One logit per image, higher = more real."""
        h = self.features(x * 2 - 1)  # (B, W, 4, 4)
        return self.head(h.flatten(1)).squeeze(1)  # (B,)


def as_buffers(module: nn.Module) -> nn.Module:
    """`module` with every parameter turned into a buffer of the same name (no optimizer,
    strategy or parameter count sees it; state dicts and `.to()` still do)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                del sub._parameters[name]
                sub.register_buffer(name, param.detach().clone())
    return module


class DCGAN(nn.Module):
    """The pair; `forward` is the discriminator (what summaries and shape checks see)."""

    def __init__(
        self,
        image: tuple[int, int, int],
        latent_dim: int,
        channels: int,
        spectral_norm: bool,
        minibatch_std: bool = False,
        ema_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.image = image
        self.ema_decay = ema_decay
        self.generator = Generator(image, latent_dim, channels)
        self.discriminator = Discriminator(image, channels, spectral_norm, minibatch_std)
        if ema_decay > 0:  # the generator's weights averaged over training, as buffers
            self.generator_ema = as_buffers(Generator(image, latent_dim, channels))
            self.generator_ema.load_state_dict(self.generator.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        """Realness logits `(B,)` of images `x`."""
        return self.discriminator(x)

    def sampling_generator(self) -> nn.Module:
        """What samples, evaluations and export draw from: the averaged generator if any."""
        return getattr(self, "generator_ema", self.generator)

    @torch.no_grad()
    def update_ema(self) -> None:
        """Move the averaged generator towards the trained one: `ema += (1 - decay) (g - ema)`
        (BatchNorm's running statistics too; its step counter is copied)."""
        if self.ema_decay <= 0:
            return
        ours = self.generator_ema.state_dict()
        for name, value in self.generator.state_dict().items():
            if value.is_floating_point():
                ours[name].lerp_(value, 1 - self.ema_decay)
            else:
                ours[name].copy_(value)

    @torch.no_grad()
    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """`num` images in [0, 1] from noise drawn with `generator`."""
        device = next(self.parameters()).device
        z = torch.randn(num, self.latent_dim, generator=generator).to(device)
        return self.sampling_generator()(z)


def build_dcgan(
    input_shape: tuple[int, ...],
    num_classes: int,
    latent_dim: int = 64,
    channels: int = 32,
    spectral_norm: bool = False,
    minibatch_std: bool = False,
    ema_decay: float = 0.0,
) -> DCGAN:
    """A DCGAN for `(C, H, W)` images with H = W a power of two >= 8.

    `minibatch_std`: D also sees the batch's diversity (`MinibatchStd`). `ema_decay` > 0 (e.g.
    0.999): an exponential moving average of the generator's weights, updated by the `gan`
    task on every generator turn, is what `sample`, evaluation and `export` use (averaged
    iterates are steadier than the last one of an oscillating game).
    """
    del num_classes  # unconditional
    image = image_shape("dcgan", input_shape)
    if image[1] != image[2]:
        raise ModelError(f"dcgan needs square images, got {image[1]}x{image[2]}", "resize")
    if not 0 <= ema_decay < 1:
        raise ModelError(f"dcgan ema_decay={ema_decay} is outside [0, 1)", "use 0 (off) or 0.999")
    return DCGAN(image, latent_dim, channels, spectral_norm, minibatch_std, ema_decay)


SPEC = register(
    ModelSpec(
        name="dcgan",
        flavors={
            "debug": {"latent_dim": 16, "channels": 8},
            "small": {"latent_dim": 64, "channels": 32},
            "base": {"latent_dim": 100, "channels": 64},
        },
        builder=build_dcgan,
        description="DCGAN generator + discriminator (non-saturating loss; optional spectral norm)",
        loss="gan",
    )
)
