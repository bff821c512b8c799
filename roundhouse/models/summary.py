"""Parameter counts, output sizes and a per-layer summary table.

The closed-form counts follow the notes: a fully connected layer has `n_in * n_out + n_out`
parameters (SEEDS E1, S0:76-85); a conv layer `c_in * c_out * k * k + c_out` (S2:68-70; S4:74
omits the bias and writes `kernel_size` for `k * k`, SEEDS H5). The output-size formula is
`(W - F + 2P) / S + 1` with P the padding *per side* (S3:956, SEEDS H10).

`summarize` runs one forward pass with hooks. It runs the model in eval mode (restored
afterwards) under `torch.no_grad()`, on a batch of one zero sample on the model's own device, so
a model built on the meta device is summarized without computing anything. Output shapes are
reported *without* the batch dimension.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


def fc_params(n_in: int, n_out: int, bias: bool = True) -> int:
    """Parameters of a fully connected layer: `n_in * n_out (+ n_out biases)`."""
    return n_in * n_out + (n_out if bias else 0)


def conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    """Parameters of a `k x k` conv layer: `c_in * c_out * k * k (+ c_out biases)`."""
    return c_in * c_out * k * k + (c_out if bias else 0)


def conv_output_size(w: int, k: int, stride: int = 1, padding: int = 0) -> float:
    """`(W - F + 2P) / S + 1` with P the padding per side.

    The result is not rounded: a non-integer means the kernel does not tile the input (S2:47);
    PyTorch floors it.
    """
    return (w - k + 2 * padding) / stride + 1


def same_padding(k: int) -> int:
    """Per-side padding that keeps H and W at stride 1: `(k - 1) / 2` (total `k - 1`, S3:962).

    Raises:
        ValueError: `k` is even, so no symmetric padding keeps the size (S3:978).
    """
    if k % 2 == 0:
        raise ValueError(f"kernel size {k} is even; use an odd kernel for symmetric padding")
    return (k - 1) // 2


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; shared parameters count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@dataclass
class LayerRow:
    """One called module in a summary.

    Attributes:
        name: Qualified module name (`"stage1.0.conv1"`).
        kind: Class name (`"Conv2d"`).
        output_shape: Output shape without the batch dimension (the first tensor of a tuple).
        num_params: The module's own parameters; 0 when the module was already counted.
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    num_params: int


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Puts `model` in eval mode and restores every module's own training flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    return None


def _dummy_input(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype):
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros((1, *input_shape), dtype=dtype, device=device)


def _reported_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules plus containers that own parameters directly (so the rows sum up)."""
    return [
        (name or type(module).__name__, module)  # the root itself when it is a single layer
        for name, module in model.named_modules()
        if not list(module.children()) or list(module.parameters(recurse=False))
    ]


def summarize(
    model: nn.Module,
    input_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    inputs: tuple[torch.Tensor, ...] | None = None,
) -> list[LayerRow]:
    """One row per call of a leaf module (and of a container with its own parameters).

    Args:
        model: Any module taking one tensor of shape `(B, *input_shape)` (or `inputs`).
        input_shape: One sample's shape without the batch dimension, e.g. `(C, H, W)`.
        dtype: Input dtype (`torch.long` for token models).
        inputs: The forward's inputs, batch first (a task's example inputs); None: one zero
            tensor of `input_shape` and `dtype`.

    Returns:
        Rows in call order. Each module's parameters are counted on its first call only, so
        the rows sum to `count_parameters(model)` when every parameter is used once.
    """
    rows: list[LayerRow] = []
    seen: set[int] = set()

    def hook(name: str, module: nn.Module, output: object) -> None:
        tensor = _first_tensor(output)
        shape = tuple(tensor.shape[1:]) if tensor is not None else ()
        own = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(LayerRow(name, type(module).__name__, shape, 0 if id(module) in seen else own))
        seen.add(id(module))

    handles = [
        module.register_forward_hook(lambda m, _i, out, n=name: hook(n, m, out))
        for name, module in _reported_modules(model)
    ]
    args = inputs if inputs is not None else (_dummy_input(model, input_shape, dtype),)
    try:
        with eval_mode(model), torch.no_grad():
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of one Conv/Linear call per sample (other modules count 0)."""
    per_sample = output.numel() // max(output.shape[0], 1)
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        return per_sample * kernel * module.in_channels // module.groups
    if isinstance(module, nn.Linear):
        return per_sample * module.in_features
    return 0


def estimate_flops(
    model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> int:
    """Forward FLOPs of one sample: 2 x the multiply-adds of every Conv and Linear call.

    Normalization, activations and pooling are ignored (they are a few percent in CNNs).
    Build the model on the meta device to estimate without computing.
    """
    total = 0

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        tensor = _first_tensor(output)
        total += _macs(module, tensor) if tensor is not None else 0

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with eval_mode(model), torch.no_grad():
            model(_dummy_input(model, input_shape, dtype))
    finally:
        for handle in handles:
            handle.remove()
    return 2 * total


def format_summary(rows: list[LayerRow], total: int) -> str:
    """A fixed-width table of `rows` followed by the total parameter count."""
    header = ("Layer", "Kind", "Output shape", "Params")
    body = [(r.name, r.kind, "x".join(map(str, r.output_shape)), f"{r.num_params:,}") for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(4)]

    def fmt(line: tuple[str, ...]) -> str:
        cells = [cell.ljust(w) for cell, w in zip(line[:3], widths[:3], strict=True)]
        return "  ".join([*cells, line[3].rjust(widths[3])])

    rule = "-" * len(fmt(header))
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, f"Total params: {total:,}"])
