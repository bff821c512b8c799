"""`model.options.norm` for the CNN zoo: which normalization layer follows each convolution.

- `batch`: `BatchNorm2d`, statistics of each rank's own batch (per-rank under data parallel);
- `sync_batch`: `BatchNorm2d` in the model; the strategy side (`parallel/sync_norm.py`) turns it
  into a BatchNorm whose statistics are those of the global batch across the data-parallel
  ranks (models never import torch.distributed). Alone (`--local`) it equals `batch`;
- `group`: `GroupNorm` with up to 32 groups (the largest count that divides the channels);
- `instance`: `InstanceNorm2d(affine=True)`, per sample and channel;
- `layer`: `GroupNorm(1, C)`, per sample over channels and positions (LayerNorm for conv maps).

None of the last three depends on the batch, so they give the same outputs at any per-rank batch
size (SEEDS S1:427-434: GroupNorm where per-rank batches are small).

Families with BatchNorm (ResNet, DenseNet, VGG `_bn`) have each BatchNorm replaced. Families
without one (LeNet, AlexNet, VGG, NiN, GoogLeNet) get the norm inserted after every `Conv2d`
(the conv becomes `Sequential(conv, norm)`, so its weight names gain a `.0`).
"""

from __future__ import annotations

import math

from torch import nn

from roundhouse.errors import ModelError

NORMS = ("batch", "sync_batch", "group", "instance", "layer")
MAX_GROUPS = 32


def build_norm(kind: str, channels: int) -> nn.Module:
    """A fresh normalization layer of `kind` for `channels` feature maps."""
    if kind in ("batch", "sync_batch"):
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.GroupNorm(1, channels)  # layer


def check_norm(kind: object, model_name: str) -> str:
    """`kind` when it is a known norm, else a `ModelError` listing them."""
    if kind not in NORMS:
        raise ModelError(
            f"model {model_name!r}: unknown options.norm {kind!r}", f"valid: {', '.join(NORMS)}"
        )
    return str(kind)


def apply_norm(model: nn.Module, kind: str, model_name: str) -> nn.Module:
    """Give `model` the normalization `kind`, in place (see the module docstring); returns it."""
    check_norm(kind, model_name)
    batch_norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if batch_norms:
        for name, module in batch_norms:
            if kind not in ("batch", "sync_batch"):
                set_submodule(model, name, build_norm(kind, module.num_features))
        return model
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name, conv in convs:
        set_submodule(model, name, nn.Sequential(conv, build_norm(kind, conv.out_channels)))
    return model


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` with `module`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
