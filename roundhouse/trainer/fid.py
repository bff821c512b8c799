"""Fréchet distance of generated images in the feature space of a roundhouse-trained classifier.

FID (SEEDS D: S3:2304, S3:3385) treats the features of real and of generated images as two
Gaussians and reports `||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))`; lower is better.
The features are not Inception's (no weights to download, and 8x8 digits are far from
ImageNet): they are the input of the last linear layer of a classifier that roundhouse trained
on the same data (`ClassifierFeatures`). `sample --score` and the benchmark use torchmetrics'
`FrechetInceptionDistance(feature=ClassifierFeatures(...))`; the validation metric sums the same
sufficient statistics over batches and ranks (`FeatureStats`) and gives the same number.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from roundhouse.errors import ModelError


class ClassifierFeatures(nn.Module):
    """A trained classifier as a feature extractor: the input of its last `nn.Linear`.

    Attributes:
        num_features: The feature dimension (torchmetrics reads it).
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ModelError(
                "the FID classifier has no nn.Linear layer to take features from",
                "train a classifier (mlp, lenet, resnet, ...) on the same data",
            )
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = linears[-1].in_features
        self.captured: Tensor | None = None
        self.last_logits: Tensor | None = None
        linears[-1].register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self.captured = inputs[0]

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features `(B, num_features)` of images `(B, C, H, W)` in [0, 1] (float64)."""
        self.last_logits = self.classifier(images.float())
        assert self.captured is not None
        return self.captured.flatten(1).double()

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Always in evaluation mode (torchmetrics switches its children to train)."""
        return super().train(False)


def load_classifier_features(ref: str, device: torch.device | str = "cpu") -> ClassifierFeatures:
    """The feature extractor of the classifier run `ref` (a run folder or step folder).

    Raises:
        CheckpointError: No run or checkpoint at `ref`.
    """
    from roundhouse.weights.saved_model import load_saved_model  # reads checkpoints

    saved = load_saved_model(ref, merge=True)
    return ClassifierFeatures(saved.model.to(device))


def feature_sums(features: Tensor, prefix: str) -> dict[str, Tensor]:
    """Sufficient statistics of `features (B, D)` as scalar sums (they add over ranks):
    `<prefix>n`, `<prefix>s<i>` and `<prefix>c<i>_<j>` for i <= j."""
    features = features.double().cpu()
    sums = {f"{prefix}n": torch.tensor(float(features.shape[0]), dtype=torch.float64)}
    total = features.sum(0)
    outer = features.T @ features
    dim = features.shape[1]
    for i in range(dim):
        sums[f"{prefix}s{i}"] = total[i]
        for j in range(i, dim):
            sums[f"{prefix}c{i}_{j}"] = outer[i, j]
    return sums


def gaussian_of(sums: dict[str, float], prefix: str, dim: int) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance from `feature_sums` added over batches and ranks."""
    n = float(sums[f"{prefix}n"])
    total = torch.tensor([float(sums[f"{prefix}s{i}"]) for i in range(dim)], dtype=torch.float64)
    outer = torch.zeros(dim, dim, dtype=torch.float64)
    for i in range(dim):
        for j in range(i, dim):
            outer[i, j] = outer[j, i] = float(sums[f"{prefix}c{i}_{j}"])
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """`||mu1 - mu2||^2 + Tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))` (as torchmetrics computes it)."""
    diff = (mu1 - mu2).square().sum()
    trace = cov1.trace() + cov2.trace()
    sqrt_trace = torch.linalg.eigvals(cov1 @ cov2).sqrt().real.sum()
    return float(diff + trace - 2 * sqrt_trace)


def torchmetrics_fid(features: ClassifierFeatures, real: Tensor, fake: Tensor) -> float:
    """torchmetrics' FID of `fake` against `real` images `(N, C, H, W)` in [0, 1]."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=True)
    for start in range(0, real.shape[0], 256):
        metric.update(real[start : start + 256], real=True)
    for start in range(0, fake.shape[0], 256):
        metric.update(fake[start : start + 256], real=False)
    return float(metric.compute())


class FIDStatistics:
    """`val/fid` for a generative task: feature statistics of each evaluation batch's real and
    generated images (`sums`), the Fréchet distance of their totals (`add_fid`).

    Args:
        classifier: The classifier run (`task.options.fid_classifier`); loaded on first use.
    """

    def __init__(self, classifier: str) -> None:
        self.classifier = classifier
        self.features: ClassifierFeatures | None = None

    def sums(self, real: Tensor, fake: Tensor) -> dict[str, Tensor]:
        """Scalar sums of one batch (they add over batches and ranks)."""
        if self.features is None:
            self.features = load_classifier_features(self.classifier, real.device)
        return {
            **feature_sums(self.features(real), "fid_r_"),
            **feature_sums(self.features(fake.detach()), "fid_f_"),
        }

    @staticmethod
    def add_fid(sums: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
        """`metrics` with `fid` from the totals (when the evaluation had any batch)."""
        if "fid_r_n" in sums:
            dim = sum(1 for k in sums if k.startswith("fid_r_s"))
            real, fake = gaussian_of(sums, "fid_r_", dim), gaussian_of(sums, "fid_f_", dim)
            metrics["fid"] = frechet_distance(*real, *fake)
        return metrics
