"""What of a model is exported, and with which inputs: `build_graph`.

Classifiers export `model(x)` with a dynamic batch axis; language models `model(ids)` with
dynamic batch and sequence axes; diffusion models their denoiser `eps(z_t, t[, cond])`; the VAE
its decoder `pixels(z)`. Anything else has no graph here and is an `ExportError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from roundhouse import models
from roundhouse.data import DataInfo
from roundhouse.errors import RoundhouseError

SAMPLE_SEQ_LEN = 16


class ExportError(RoundhouseError):
    """A model, format or option that cannot be exported."""


@dataclass
class ExportGraph:
    """A module to trace and how to make its inputs.

    Attributes:
        module: the module torch.onnx traces (in eval mode).
        sample: `sample(batch, generator, variant)` -> the module's positional inputs for
            `batch` rows (language models: a shorter sequence for each `variant`).
        input_names: one name per input.
        dynamic_axes: torch.onnx's `{name: {axis: label}}` for inputs and the output.
        kind: what was exported (`classifier`, `language model`, `denoiser`, `decoder`).
        scored: True when the output is logits (test-split accuracy makes sense).
    """

    module: nn.Module
    sample: Callable[..., tuple[Tensor, ...]]
    input_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    kind: str
    scored: bool
    part: str | None = None  # a model exported as several files: this file's name suffix


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


def _batch_axes(names: list[str]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in [*names, "output"]}


def classifier_graph(model: nn.Module, info: DataInfo, dtype: torch.dtype) -> ExportGraph:
    """The export graph of a classifier: random inputs of the data's shape and dtype."""
    shape = tuple(info.input_shape)

    def sample(batch: int, gen: torch.Generator, variant: int = 0) -> tuple[Tensor, ...]:
        if dtype.is_floating_point:
            return (torch.rand((batch, *shape), generator=gen).to(dtype),)
        vocab = info.vocab_size or info.num_classes  # text: token ids, not labels
        return (torch.randint(0, min(vocab, 256), (batch, *shape), generator=gen),)

    # Regression outputs are values: no test accuracy to score.
    scored = not info.has_values
    kind = "classifier" if scored else "regressor"
    return ExportGraph(model, sample, ["input"], _batch_axes(["input"]), kind, scored)


def language_model_graph(model: nn.Module, info: DataInfo) -> ExportGraph:
    """The export graph of a language model: token ids with dynamic batch and sequence axes."""
    vocab = info.num_classes
    length = min(SAMPLE_SEQ_LEN, int(info.input_shape[0]))

    fixed = getattr(model, "unrolled_in_time", False)  # recurrent: the traced length only

    def sample(batch: int, gen: torch.Generator, variant: int = 0) -> tuple[Tensor, ...]:
        size = length if fixed else max(2, length - 5 * variant)  # checks at other lengths
        return (torch.randint(0, min(vocab, 256), (batch, size), generator=gen),)

    if fixed:
        axes = {"input": {0: "batch"}, "output": {0: "batch"}}
        return ExportGraph(
            model, sample, ["input"], axes, f"language model (length {length})", True
        )
    axes = {"input": {0: "batch", 1: "sequence"}, "output": {0: "batch", 1: "sequence"}}
    return ExportGraph(model, sample, ["input"], axes, "language model", True)


def denoiser_graph(model: nn.Module) -> ExportGraph:
    """The export graph of a diffusion model's denoiser: `(z_t, t[, cond]) -> eps`."""
    from roundhouse.models.diffusion.model import find_diffusion_model

    diffusion = find_diffusion_model(model)
    encoder = diffusion.cond_encoder
    latent = tuple(diffusion.latent_shape)
    steps = diffusion.schedule.num_steps

    def sample(batch: int, gen: torch.Generator, variant: int = 0) -> tuple[Tensor, ...]:
        z = torch.randn((batch, *latent), generator=gen)
        t = torch.randint(0, steps, (batch,), generator=gen)
        if encoder.kind == "none":
            return z, t
        labels = torch.randint(0, encoder.num_classes, (batch,), generator=gen)
        return z, t, encoder.from_labels(labels)

    names = ["z", "t"] if encoder.kind == "none" else ["z", "t", "cond"]
    return ExportGraph(Denoiser(diffusion), sample, names, _batch_axes(names), "denoiser", False)


def decoder_graph(model: nn.Module) -> ExportGraph:
    """The export graph of a VAE's decoder: latent codes -> pixels."""
    latent = tuple(model.latent_shape)

    def sample(batch: int, gen: torch.Generator, variant: int = 0) -> tuple[Tensor, ...]:
        return (torch.randn((batch, *latent), generator=gen),)

    return ExportGraph(VAEDecoder(model), sample, ["z"], _batch_axes(["z"]), "decoder", False)


def build_graph(
    model: nn.Module, model_name: str, info: DataInfo, input_dtype: torch.dtype
) -> ExportGraph:
    """The part of `model` (a `model_name` model for data `info`) that is exported."""
    task = models.get(model_name).loss
    model.eval()
    if task in ("classification", "text_classification"):
        return classifier_graph(model, info, input_dtype)
    if task in ("language_model", "masked_lm"):
        return language_model_graph(model, info)
    if task == "diffusion":
        return denoiser_graph(model)
    if task == "vae":
        return decoder_graph(model)
    raise ExportError(
        f"model {model_name} (task {task}) has no export graph",
        "export classifiers, language models, diffusion models or the VAE",
    )
