"""Diffusion models (SEEDS A24-A26): schedules, samplers, UNet, DiT, latent diffusion.

Importing this package registers `ddpm`, `ldm` and `dit` (see `zoo.py`); the stage-1 `vae`
lives in `roundhouse.models.vae`.
"""

from roundhouse.models.diffusion import zoo  # noqa: F401  (registers the models)
from roundhouse.models.diffusion.model import DiffusionModel, find_diffusion_model
from roundhouse.models.diffusion.samplers import SamplerConfig

__all__ = ["DiffusionModel", "SamplerConfig", "find_diffusion_model"]
