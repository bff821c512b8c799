"""Tasks of the generative image models: `vae` (stage 1) and `diffusion` (DDPM, LDM, DiT).

Batches are the image datasets' `{"input": (B, C, H, W) in [0, 1], "target": (B,) labels}`.

`vae`: the model reconstructs the input and stores its per-image KL (`VAE.kl_loss`); the loss is
the per-image sum of squared errors on the [-1, 1] scale plus `kl_weight * KL`, averaged over
the batch. Metrics: `loss`, `mse` (per pixel, [0, 1] scale), `psnr` (dB), `kl` (per image).

`diffusion` (SEEDS A24): draw `t ~ U{0..T-1}` and `eps ~ N(0, I)` per image, the model predicts
the noise of `x_t`, the loss is `||eps - eps_theta(x_t, t, c)||^2` (mean over elements). For
classifier-free guidance the condition (class label, or its caption for text conditioning) is
replaced by the null condition with probability `p_uncond` in training. Training draws from
the global torch RNG (seeded, and saved in checkpoints, so resume is exact); evaluation draws
from a generator seeded by the batch's pixels, so every evaluation of a split sees the same
timesteps and noise, and `val/loss` is comparable across steps (always with the condition).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.data import DataInfo
from roundhouse.errors import ModelError
from roundhouse.trainer.fid import FIDStatistics
from roundhouse.trainer.sampling import DIFFUSION_OPTIONS, diffusion_images, vae_images
from roundhouse.trainer.task_api import ExampleInputs, SampleRequest, Task, unwrap

logger = logging.getLogger(__name__)


def _find(model: nn.Module, attr: str) -> nn.Module:
    for module in model.modules():
        if hasattr(module, attr):
            return module
    raise ModelError(f"the model has no {attr!r}", "use a model whose task this is")


class Denoiser(nn.Module):
    """A diffusion model's noise predictor as a plain module: `(z_t, t[, cond]) -> eps`."""

    def __init__(self, diffusion: nn.Module) -> None:
        super().__init__()
        self.diffusion = diffusion

    def forward(self, z: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The predicted noise of latents `z` at timesteps `t` (under `cond`, if any)."""
        return self.diffusion.denoise(z, t, cond)


class VAEDecoder(nn.Module):
    """A VAE's decoder: codes `(B, *latent_shape)` -> pixels `(B, C, H, W)` on [0, 1]."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        """Pixels on [0, 1] decoded from latent codes `z`."""
        return self.vae.decode(z)


class VAETask(Task):
    """Reconstruction + weighted KL; see the module docstring. `export` writes the decoder
    (latent codes in, pixels out)."""

    export_kind = "decoder"
    can_sample = True  # `roundhouse sample`: images decoded from the prior (`--num`)

    def __init__(self, fid_classifier: str | None = None) -> None:
        self.kl: Tensor | None = None
        self.kl_weight = 0.0
        self.fid = FIDStatistics(fid_classifier) if fid_classifier else None
        self.fake: Tensor | None = None
        if self.fid is not None:
            self.metric = "fid"  # type: ignore[misc]

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        return ("loss", "mse", "psnr", "kl", *(("fid",) if self.fid is not None else ()))

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The reconstruction; the model's KL term is kept for `loss` (in evaluation with a
        FID classifier, also as many decoded prior samples as the batch has images)."""
        recon = model(batch["input"])  # (B, C, H, W)
        vae = _find(model, "kl_loss")
        self.kl, self.kl_weight = vae.kl_loss, float(vae.kl_weight)
        if self.fid is not None and not vae.training:
            self.fake = vae.sample(recon.shape[0], eval_generator(batch["input"]))
        return recon

    @staticmethod
    def squared_error(outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Per-image sum of squared errors on the [-1, 1] scale: `(B,)`."""
        return ((outputs.float() - batch["input"].float()) * 2).square().flatten(1).sum(1)

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Reconstruction loss plus the weighted KL term."""
        assert self.kl is not None
        return (self.squared_error(outputs, batch) + self.kl_weight * self.kl.float()).mean()

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed loss, squared error, pixels, KL and sample count of one evaluation batch."""
        assert self.kl is not None
        sq = self.squared_error(outputs, batch).detach()
        count = torch.tensor(float(sq.shape[0]), device=outputs.device)
        return {
            "loss": self.loss(outputs, batch).detach() * count,
            "sq_err": sq.sum() / 4,  # back to the [0, 1] scale
            "pixels": torch.tensor(float(outputs[0].numel()), device=outputs.device) * count,
            "kl": self.kl.detach().float().sum(),
            "count": count,
        } | self.fid_sums(batch)

    def fid_sums(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """FID statistics of the batch and its generated images (none without a classifier)."""
        if self.fid is None or self.fake is None:
            return {}
        return self.fid.sums(batch["input"], self.fake)

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Means from sums over every rank."""
        n = max(float(sums["count"]), 1.0)
        mse = float(sums["sq_err"]) / max(float(sums["pixels"]), 1.0)
        metrics = {
            "loss": float(sums["loss"]) / n,
            "mse": mse,
            "psnr": 10 * math.log10(1.0 / max(mse, 1e-12)),
            "kl": float(sums["kl"]) / n,
        }
        return FIDStatistics.add_fid(sums, metrics)

    def export_module(self, model: nn.Module) -> nn.Module:
        """The decoder: latent codes -> pixels."""
        return VAEDecoder(unwrap(model))

    def export_inputs(
        self,
        model: nn.Module,
        info: DataInfo,
        dtype: torch.dtype,
        batch_size: int,
        generator: torch.Generator,
        variant: int = 0,
    ) -> ExampleInputs:
        """Codes `z ~ N(0, I)` `(B, *latent_shape)`."""
        latent = tuple(unwrap(model).latent_shape)
        return ExampleInputs(
            (torch.randn((batch_size, *latent), generator=generator),), names=("z",)
        )

    def sample_output(self, model: nn.Module, request: SampleRequest, job: Any) -> Tensor:
        """`--num` images decoded from latent codes drawn from the prior."""
        return vae_images(unwrap(model).eval(), request)


def eval_generator(images: Tensor) -> torch.Generator:
    """A CPU generator seeded by the batch's pixels (the same batch, the same draws)."""
    seed = int((images.double().sum() * 1000).round().item()) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class DiffusionTask(Task):
    """Noise-prediction MSE with condition dropout; see the module docstring.

    With `fid_classifier`, evaluation also draws as many images as each batch has (DDIM,
    `fid_steps` steps, the batch's labels as the condition) for `fid`, the task's metric then.
    `export` writes the denoiser `eps(z_t, t[, cond])`.
    """

    export_kind = "denoiser"
    can_sample = True
    sample_options = DIFFUSION_OPTIONS

    def __init__(self, fid_classifier: str | None = None, fid_steps: int = 20) -> None:
        self.noise: Tensor | None = None
        self.fid = FIDStatistics(fid_classifier) if fid_classifier else None
        self.fid_steps = fid_steps
        self.fake: Tensor | None = None
        if self.fid is not None:
            self.metric = "fid"  # type: ignore[misc]

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        return ("loss", *(("fid",) if self.fid is not None else ()))

    def draw(
        self, model: nn.Module, batch: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Timesteps `(B,)`, noise `(B, *latent)` and the (possibly dropped) condition."""
        dm = _find(model, "cond_encoder")
        x = batch["input"]
        gen = None if dm.training else eval_generator(x)
        size, device = x.shape[0], x.device
        t = torch.randint(0, dm.schedule.num_steps, (size,), generator=gen).to(device)
        noise = torch.randn((size, *dm.latent_shape), generator=gen).to(device, x.dtype)
        cond = dm.cond_encoder.from_labels(batch["target"])
        if cond is not None and dm.training and dm.p_uncond > 0:
            keep = torch.rand(size, generator=gen).to(device) >= dm.p_uncond
            cond = dm.cond_encoder.drop(cond, keep)
        return t, noise, cond

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Predicted noise for the batch at freshly drawn timesteps, noise and condition dropout."""
        t, noise, cond = self.draw(model, batch)
        self.noise = noise
        dm = _find(model, "cond_encoder")
        if self.fid is not None and not dm.training:
            self.fake = self.generate(dm, batch)
        return model(batch["input"], t, cond, noise)  # (B, *latent) predicted noise

    def generate(self, dm: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Images for FID, conditioned on the batch's labels, from pixel-seeded noise."""
        from roundhouse.models.diffusion import SamplerConfig

        cond = dm.cond_encoder.from_labels(batch["target"])
        config = SamplerConfig(sampler="ddim", num_steps=self.fid_steps)
        return dm.sample(batch["input"].shape[0], config, cond, eval_generator(batch["input"]))

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Mean squared error of the predicted noise."""
        assert self.noise is not None
        return F.mse_loss(outputs.float(), self.noise.float())

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed noise-prediction loss and the count of one evaluation batch."""
        count = torch.tensor(float(outputs.shape[0]), device=outputs.device)
        sums = {"loss": self.loss(outputs, batch).detach() * count, "count": count}
        if self.fid is not None and self.fake is not None:
            sums.update(self.fid.sums(batch["input"], self.fake))
        return sums

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """The mean loss (and `fid`) from sums over every rank."""
        loss = float(sums["loss"]) / max(float(sums["count"]), 1.0)
        return FIDStatistics.add_fid(sums, {"loss": loss})

    def export_module(self, model: nn.Module) -> nn.Module:
        """The denoiser of the diffusion model inside `model`."""
        from roundhouse.models.diffusion.model import find_diffusion_model

        return Denoiser(find_diffusion_model(model))

    def export_inputs(
        self,
        model: nn.Module,
        info: DataInfo,
        dtype: torch.dtype,
        batch_size: int,
        generator: torch.Generator,
        variant: int = 0,
    ) -> ExampleInputs:
        """Noisy latents `z`, timesteps `t` and, for a conditional model, a condition `cond`."""
        from roundhouse.models.diffusion.model import find_diffusion_model

        dm = find_diffusion_model(model)
        z = torch.randn((batch_size, *dm.latent_shape), generator=generator)
        t = torch.randint(0, dm.schedule.num_steps, (batch_size,), generator=generator)
        encoder = dm.cond_encoder
        if encoder.kind == "none":
            return ExampleInputs((z, t), names=("z", "t"))
        labels = torch.randint(0, encoder.num_classes, (batch_size,), generator=generator)
        return ExampleInputs((z, t, encoder.from_labels(labels)), names=("z", "t", "cond"))

    def check_sample(self, request: SampleRequest, job: Any) -> None:
        """The diffusion flags; `--prompt` too for a text-conditioned model (its caption)."""
        if job.model.options.get("condition", "class") == "text":
            self.sample_options = DIFFUSION_OPTIONS | {"prompt"}  # type: ignore[misc]
        super().check_sample(request, job)

    def sample_output(self, model: nn.Module, request: SampleRequest, job: Any) -> Tensor:
        """`--num` images (DDPM/DDIM, classifier-free guidance) under their conditions."""
        return diffusion_images(unwrap(model).eval(), request)
