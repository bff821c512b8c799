"""Latent diffusion (SEEDS A26): stage 2 diffuses the latents of a frozen stage-1 VAE.

Training order (S3:3489): first train the VAE (`model.name: vae`), then the denoiser and the
condition encoder on its latents. The stage-2 job names the stage-1 run in
`model.options.vae_checkpoint`: a run folder (its `checkpoints/latest` is used) or one
`checkpoints/step_<N>` folder, on any fsspec URL. The builder reads that run's `job.yaml`
(VAE flavor and options), verifies the checkpoint's sha256, loads the weights with
`torch.load(weights_only=True)` and freezes them.

The latents are scaled to unit variance (the LDM paper's `scale_factor`): at build time the
VAE encodes up to 512 validation images of the stage-1 job's own data, and `1 / std` becomes
the `latent_scale` buffer (saved with the stage-2 checkpoint). Building on the meta device
(`--dry-run`) skips loading and calibration.

The VAE weights are part of the stage-2 model's state (frozen, excluded from the optimizer), so
a stage-2 checkpoint is complete; `roundhouse sample` still needs the stage-1 run's `job.yaml`
to rebuild the VAE's architecture.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import fsspec
import torch
import yaml
from torch import Tensor, nn

from roundhouse.errors import CheckpointError, ModelError
from roundhouse.models.diffusion.model import DiffusionModel
from roundhouse.models.registry import BuildConfig, get

logger = logging.getLogger(__name__)

MAX_CALIBRATION_IMAGES = 512


class LatentDiffusionModel(DiffusionModel):
    """A `DiffusionModel` whose diffused space is `latent_scale * VAE.encode(x).mean`."""

    def __init__(self, *args: Any, vae: nn.Module, latent_scale: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.vae = vae.requires_grad_(False).eval()
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))

    def train(self, mode: bool = True) -> LatentDiffusionModel:
        """Set the training mode; the frozen stage-1 VAE always stays in evaluation mode."""
        super().train(mode)
        self.vae.eval()  # frozen stage 1: always in evaluation mode
        return self

    def to_latent(self, x: Tensor) -> Tensor:
        """Encode images into scaled latents with the frozen VAE (its mean, no gradient)."""
        with torch.no_grad():
            mean, _ = self.vae.encode(x)
        return mean * self.latent_scale

    def from_latent(self, z: Tensor) -> Tensor:
        """Decode scaled latents into images in [0, 1]."""
        return self.vae.decode(z / self.latent_scale).clamp(0, 1)


def _fs_join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def resolve_checkpoint(ref: str) -> tuple[str, str]:
    """`(run folder, step folder)` for a run folder or a `checkpoints/step_<N>` folder.

    Raises:
        CheckpointError: Neither a complete checkpoint nor a run with `checkpoints/latest`.
    """
    fs, _ = fsspec.core.url_to_fs(ref)
    ref = ref.rstrip("/")
    if fs.exists(_fs_join(ref, "manifest.json")):
        return ref.rsplit("/", 2)[0], ref
    latest = _fs_join(ref, "checkpoints", "latest")
    if fs.exists(latest):
        step = fs.cat_file(latest).decode().strip()
        return ref, _fs_join(ref, "checkpoints", step)
    raise CheckpointError(
        f"model.options.vae_checkpoint={ref!r} has no checkpoint",
        "point it at the stage-1 VAE run folder (with checkpoints/latest) or a "
        "checkpoints/step_<N> folder",
    )


def read_stage1(ref: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The stage-1 run's job (as a dict) and its model weights, sha256-verified."""
    run, step = resolve_checkpoint(ref)
    fs, _ = fsspec.core.url_to_fs(run)
    job = yaml.safe_load(fs.cat_file(_fs_join(run, "job.yaml")).decode())
    manifest = json.loads(fs.cat_file(_fs_join(step, "manifest.json")).decode())
    data = fs.cat_file(_fs_join(step, "state.pt"))
    if hashlib.sha256(data).hexdigest() != manifest["files"]["state.pt"]["sha256"]:
        raise CheckpointError(f"checkpoint {step} is corrupt (sha256 mismatch)", "retrain stage 1")
    state = torch.load(io.BytesIO(data), weights_only=True)
    if job.get("model", {}).get("name") != "vae":
        raise ModelError(
            f"model.options.vae_checkpoint={ref!r} is a {job.get('model', {}).get('name')!r} run",
            "point it at a run of model vae (stage 1)",
        )
    return job, state["strategy"]["model"]


def load_stage1_vae(ref: str, input_shape: tuple[int, ...]) -> tuple[nn.Module, dict[str, Any]]:
    """Builds the stage-1 VAE for `input_shape` and loads its weights (skipped on meta)."""

    job, weights = read_stage1(ref)
    config = BuildConfig(
        flavor=job["model"].get("flavor", "debug"),
        input_shape=input_shape,
        options=job["model"].get("options") or {},
    )
    vae = get("vae").build(config)
    if not next(vae.parameters()).is_meta:
        try:
            vae.load_state_dict(weights)
        except RuntimeError as err:
            raise ModelError(
                f"the stage-1 VAE at {ref!r} does not fit input {input_shape}: "
                f"{str(err).splitlines()[0]}",
                "train stage 2 on images with the stage-1 channel count",
            ) from None
    return vae, job


@torch.no_grad()
def calibrate_latent_scale(vae: nn.Module, stage1_job: dict[str, Any]) -> float:
    """`1 / std` of the VAE's latent means over the stage-1 job's validation images."""
    if next(vae.parameters()).is_meta:
        return 1.0
    from roundhouse.config import DataConfig
    from roundhouse.config.validation import validate_model
    from roundhouse.data import build_splits  # lazy: the data layer is only needed here

    data = validate_model(DataConfig, stage1_job.get("data") or {}, "stage-1 job.yaml: data")
    seed = int((stage1_job.get("trainer") or {}).get("seed", 0))
    images = build_splits(data, seed=seed).val.inputs[:MAX_CALIBRATION_IMAGES]
    mean, _ = vae.encode(images.float())
    std = float(mean.std())
    logger.info("latent std of the stage-1 VAE: %.4f (scale %.4f)", std, 1 / max(std, 1e-6))
    return 1.0 / max(std, 1e-6)
