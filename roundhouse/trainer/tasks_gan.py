"""`gan`: a generator and a discriminator trained in turn (SEEDS A21, S3:2257-2267).

Each training step: fix G and update D so that real images score high and generated ones low
(`softplus(-D(x)) + softplus(D(G(z)))`, the binary cross-entropy of "real"); then fix D and
update G with the non-saturating loss `softplus(-D(G(z)))` (maximize log D(G(z)) rather than
minimize log(1 - D(G(z))), whose gradient vanishes while D wins easily). Two optimizers,
`discriminator` then `generator` (`task.order` changes it); each may have its own settings
under `task.optimizers`. Noise comes from the global torch RNG (seeded, checkpointed).
`task.options.real_label: 0.9` is one-sided label smoothing (Salimans et al., 2016): D's target
for real images is 0.9, so it cannot grow overconfident on them; generated ones stay at 0.

Validation: `d_loss`, `g_loss`, `loss` (their sum), `d_real_acc`/`d_fake_acc` (how often D is
right), on noise drawn from a generator seeded by the batch's pixels (the same at every
evaluation). With `task.options.fid_classifier: RUN` (a classifier roundhouse trained on the same
data) also `fid`, the Fréchet distance of as many generated images as real ones in that
classifier's feature space: then `fid` is the task's metric for early stopping and tune.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from roundhouse.data import DataInfo
from roundhouse.trainer.fid import FIDStatistics
from roundhouse.trainer.task_api import ExampleInputs, OptimizerSpec, Task, TaskError, unwrap


def drawing_generator(net: nn.Module) -> nn.Module:
    """The generator that samples, evaluations and export use (a model's weight average, when
    it keeps one: `sampling_generator`)."""
    pick = getattr(net, "sampling_generator", None)
    return pick() if callable(pick) else net.generator


class GANTask(Task):
    """Non-saturating GAN objective over a model with `generator` and `discriminator`."""

    can_sample = True
    export_kind = "generator"

    def __init__(self, fid_classifier: str | None = None, real_label: float = 1.0) -> None:
        if not 0.5 < real_label <= 1.0:
            raise TaskError(
                f"task.options.real_label={real_label} is outside (0.5, 1]",
                "use 1.0 (no smoothing) or one-sided label smoothing such as 0.9",
            )
        self.real_label = real_label
        self.fid = FIDStatistics(fid_classifier) if fid_classifier else None
        if self.fid is not None:
            self.metric = "fid"  # type: ignore[misc]  # the instance's selection metric

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns."""
        fid = ("fid",) if self.fid is not None else ()
        return ("loss", "d_loss", "g_loss", "d_real_acc", "d_fake_acc", *fid)

    def optimizers(self) -> list[OptimizerSpec]:
        """The discriminator, then the generator, each over its own parameters."""
        return [
            OptimizerSpec("discriminator", ["discriminator.*"]),
            OptimizerSpec("generator", ["generator.*"]),
        ]

    @staticmethod
    def noise(net: nn.Module, num: int, device: torch.device, generator: Any = None) -> Tensor:
        """`z ~ N(0, I)` of shape `(num, latent_dim)`."""
        return torch.randn(num, net.latent_dim, generator=generator).to(device)

    def step_loss(self, model: nn.Module, batch: dict[str, Tensor], optimizer: str) -> Tensor:
        """D's turn: real vs generated cross-entropy. G's turn: the non-saturating loss."""
        net = unwrap(model)
        real = batch["input"]
        if optimizer == "generator" and net.training and hasattr(net, "update_ema"):
            net.update_ema()  # towards the weights the last generator step left
        fake = net.generator(self.noise(net, real.shape[0], real.device))
        if optimizer == "discriminator":
            d_real, d_fake = net.discriminator(real).float(), net.discriminator(fake.detach())
            smoothed = self.real_label * F.softplus(-d_real) + (1 - self.real_label) * F.softplus(
                d_real
            )
            return smoothed.mean() + F.softplus(d_fake.float()).mean()
        return F.softplus(-net.discriminator(fake).float()).mean()

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Evaluation: D's logits of the real batch and of as many generated images `(2B,)`,
        and the generated images kept for FID."""
        net = unwrap(model)
        real = batch["input"]
        seed = int((real.double().sum() * 1000).round().item()) % (2**63 - 1)
        z = self.noise(net, real.shape[0], real.device, torch.Generator().manual_seed(seed))
        self.fake = drawing_generator(net)(z)
        return torch.cat([net.discriminator(real), net.discriminator(self.fake)])

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """D's loss on evaluation logits `(2B,)` (real first)."""
        d_real, d_fake = outputs.float().chunk(2)
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Summed D and G losses and D's hits (plus FID statistics with a classifier)."""
        d_real, d_fake = outputs.detach().float().cpu().chunk(2)
        sums = {
            "d_loss": (F.softplus(-d_real) + F.softplus(d_fake)).sum(),
            "g_loss": F.softplus(-d_fake).sum(),
            "d_real_hits": (d_real > 0).float().sum(),
            "d_fake_hits": (d_fake < 0).float().sum(),
            "count": torch.tensor(float(d_real.shape[0])),
        }
        if self.fid is not None:
            sums.update(self.fid.sums(batch["input"], self.fake))
        return sums

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Means over every batch and rank; `fid` from the summed feature statistics."""
        n = max(float(sums["count"]), 1.0)
        d_loss, g_loss = float(sums["d_loss"]) / n, float(sums["g_loss"]) / n
        metrics = {
            "loss": d_loss + g_loss,
            "d_loss": d_loss,
            "g_loss": g_loss,
            "d_real_acc": float(sums["d_real_hits"]) / n,
            "d_fake_acc": float(sums["d_fake_hits"]) / n,
        }
        return FIDStatistics.add_fid(sums, metrics)

    def sample(self, model: nn.Module, num: int, generator: torch.Generator) -> Tensor:
        """`num` generated images `(N, C, H, W)` in [0, 1]."""
        net = unwrap(model).eval()
        with torch.no_grad():
            device = next(net.parameters()).device
            return drawing_generator(net)(self.noise(net, num, device, generator))

    def export_module(self, model: nn.Module) -> nn.Module:
        """`export` writes the generator (noise in, images out; the averaged one if any)."""
        return drawing_generator(unwrap(model))

    def export_inputs(
        self,
        model: nn.Module,
        info: DataInfo,
        dtype: torch.dtype,
        batch_size: int,
        generator: torch.Generator,
        variant: int = 0,
    ) -> ExampleInputs:
        """Noise `z` `(B, latent_dim)` for the exported generator (images out)."""
        net = unwrap(model)
        return ExampleInputs((self.noise(net, batch_size, "cpu", generator),), names=("z",))
