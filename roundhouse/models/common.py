"""Pieces the families share: input checks, shape probing, pipeline layers, FLOPs, tracing.

Input-size policy: a family builds the same architecture for every input (a flavor never
changes with the image size) and ends in adaptive pooling where the architecture allows, so one
model name runs on 1x8x8 digits and on 3x224x224 images. When the fixed downsampling of a flavor
shrinks an input to nothing, `check_fits` raises `ModelError` at build time naming the model,
the input and the smallest square size the flavor accepts. It finds that size with forward
passes on the meta device (no memory, no compute), so it can never disagree with the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from roundhouse.errors import ModelError
from roundhouse.models.spec import BuildConfig, ModelSpec
from roundhouse.models.summary import estimate_flops

logger = logging.getLogger(__name__)

# Largest square side the minimum-size search tries before giving the underlying error.
MAX_PROBE_SIZE = 4096
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


def is_tracing() -> bool:
    """Whether the model runs under `torch.jit.trace` or `torch.onnx.export`: sizes and
    data-dependent branches must then stay in the graph, not become constants."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def image_shape(model_name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Returns `(C, H, W)`, or raises `ModelError` if `input_shape` is not an image shape."""
    if len(input_shape) != 3:
        raise ModelError(
            f"model {model_name!r} needs an image input (C, H, W), got shape {input_shape}",
            "set the data's per-sample shape to (channels, height, width)",
        )
    c, h, w = (int(d) for d in input_shape)
    return c, h, w


def get_activation(name: str) -> nn.Module:
    """A fresh activation module by name (`relu`, `sigmoid`, `tanh`, `leaky_relu`, `elu`)."""
    if name not in ACTIVATIONS:
        raise ModelError(
            f"unknown activation {name!r}", f"valid activations: {', '.join(ACTIVATIONS)}"
        )
    return ACTIVATIONS[name]()


def check_dropout(p: float) -> float:
    """Returns `p` if it is a probability, else raises `ModelError`."""
    try:
        value = float(p)
    except (TypeError, ValueError):
        value = -1.0  # reported below like any other out-of-range value
    if not 0.0 <= value < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {p!r}", "set model.options.dropout")
    return value


def init_weights(model: nn.Module, activation: str = "relu") -> nn.Module:
    """Initializes Conv/Linear weights in place for the activation; biases to zero.

    ReLU-family nets get He (Kaiming) normal init, saturating ones (sigmoid, tanh) Xavier, as
    d2l does. PyTorch's default init shrinks activations layer by layer, which left small
    nets such as LeNet nearly flat over their first tens of steps.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if activation in ("sigmoid", "tanh"):
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def conv_act(c_in: int, c_out: int, k: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    """`Conv2d -> ReLU`: an activation follows every conv because conv is linear (S3:942)."""
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding), nn.ReLU()]


def _meta_forward(module: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...] | Exception:
    """Per-sample output shape on the meta device, or the error the forward raised."""
    try:
        with torch.no_grad():
            out = module(torch.empty((2, *input_shape), device="meta"))
    # Conv, pool and batch-norm raise RuntimeError/ValueError on maps that shrank to nothing;
    # torch._assert (e.g. a ViT's fixed image size) raises AssertionError.
    except (RuntimeError, ValueError, AssertionError) as err:
        return err
    return tuple(out.shape[1:])


def _smallest_square(module: nn.Module, channels: int) -> int | None:
    """Smallest side S such that a (channels, S, S) input fits (sizes are monotone).

    Doubles up from 1, then bisects: too-small inputs fail within the first layers, so this
    runs few complete forward passes.
    """

    def fits(side: int) -> bool:
        return not isinstance(_meta_forward(module, (channels, side, side)), Exception)

    hi = 1
    while not fits(hi):
        if hi >= MAX_PROBE_SIZE:
            return None
        hi *= 2
    lo = hi // 2 + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return hi


def check_fits(
    model_name: str,
    make: Callable[[], nn.Module],
    input_shape: tuple[int, ...],
    hint: str = "use the 'debug' flavor",
) -> tuple[int, ...]:
    """Builds `make()` on the meta device and returns its per-sample output shape.

    `hint` completes the fix in the error message (how this family handles small inputs).

    Raises:
        ModelError: The module cannot take `input_shape`; names the smallest square input.
    """
    with torch.device("meta"):
        probe = make()
    probe.eval()  # batch-norm in training mode rejects 1x1 maps at batch 1; eval never does
    result = _meta_forward(probe, input_shape)
    if not isinstance(result, Exception):
        return result
    smallest = _smallest_square(probe, input_shape[0])
    if smallest is None:  # no square size fits: not a question of size, so pass the reason on
        raise ModelError(
            f"model {model_name!r} cannot take input {tuple(input_shape)}: {result}",
            "check the input shape this model expects",
        ) from result
    raise ModelError(
        f"model {model_name!r} cannot take input {tuple(input_shape)}: its downsampling needs "
        f"at least {smallest}x{smallest}",
        f"resize inputs to at least {smallest}x{smallest}, or {hint}",
    ) from result


def sequential_layers(model: nn.Module) -> list[nn.Module]:
    """Flattens nested plain `nn.Sequential` containers into a list of blocks.

    A module with its own `forward` (a residual or Inception block) stays whole, so applying
    the returned modules one after another equals `model(x)`.

    Raises:
        TypeError: `model` itself is not a plain sequential container.
    """
    if type(model).forward is not nn.Sequential.forward:
        raise TypeError(f"{type(model).__name__} is not sequential; it has no pipeline layers")
    layers: list[nn.Module] = []
    for child in model:
        if type(child).forward is nn.Sequential.forward:
            layers.extend(sequential_layers(child))
        else:
            layers.append(child)
    return layers


def flops_on_meta(spec: ModelSpec, config: BuildConfig) -> int:
    """Forward FLOPs of one sample of `spec` built for `config`, counted on the meta device."""
    with torch.device("meta"):
        model = spec.build(config)
    return estimate_flops(model, config.input_shape)


def build_fc_classifier(
    num_features: int, hidden: int, num_classes: int, dropout: float
) -> nn.Sequential:
    """AlexNet/VGG head: flatten, two hidden FCs with ReLU and dropout (S3:1070-1078), output FC."""
    return nn.Sequential(
        nn.Flatten(),  # (B, num_features)
        nn.Linear(num_features, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),  # (B, num_classes)
    )
