"""MLP: a multi-layer perceptron on the flattened input (SEEDS A1).

`Flatten -> (Linear -> activation [-> Dropout]) x n -> Linear`. Each layer computes
`activation(Wx + b)` and has `n_in * n_out + n_out` parameters (S0:76-85). Hidden widths shrink
layer by layer and are powers of two (S1:91-94; S3:274). Any input shape works: the first layer
takes `prod(input_shape)` features, so `(1, 8, 8)` digits give 64 inputs.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence

from torch import nn

from roundhouse.models.common import (
    check_dropout,
    get_activation,
    init_weights,
    sequential_layers,
)
from roundhouse.models.registry import ModelSpec, meta_flops, register

logger = logging.getLogger(__name__)


class MLP(nn.Sequential):
    """Fully connected classifier; input `(B, *input_shape)`, output logits `(B, num_classes)`."""

    def __init__(
        self,
        num_inputs: int,
        num_classes: int,
        hidden_sizes: Sequence[int],
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]  # (B, prod(shape))
        widths = [num_inputs, *hidden_sizes]
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            layers.append((f"fc{i + 1}", nn.Linear(n_in, n_out)))
            # Without a non-linearity stacked linear layers collapse into one (S3:282).
            layers.append((f"act{i + 1}", get_activation(activation)))
            if dropout > 0:
                layers.append((f"drop{i + 1}", nn.Dropout(dropout)))
        layers.append(("head", nn.Linear(widths[-1], num_classes)))  # (B, num_classes)
        super().__init__(OrderedDict(layers))


def build_mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden_sizes: Sequence[int] = (64,),
    activation: str = "relu",
    dropout: float = 0.0,
) -> MLP:
    """Builds an `MLP` for any input shape.

    Args:
        input_shape: Per-sample shape; flattened to `prod(input_shape)` inputs.
        num_classes: Logits out.
        hidden_sizes: Width of each hidden layer, in order (may be empty: softmax regression).
        activation: `relu`, `sigmoid`, `tanh`, `leaky_relu` or `elu` (S1:83).
        dropout: Dropout after each hidden activation; 0 disables it.
    """
    hidden = tuple(int(h) for h in hidden_sizes)
    model = MLP(math.prod(input_shape), num_classes, hidden, activation, check_dropout(dropout))
    return init_weights(model, activation)


SPEC = register(
    ModelSpec(
        name="mlp",
        flavors={
            "debug": {"hidden_sizes": (64,)},
            "small": {"hidden_sizes": (256, 128)},
            "large": {"hidden_sizes": (1024, 512, 256)},
        },
        builder=build_mlp,
        description="Multi-layer perceptron on the flattened input (any input shape).",
        pipeline_layers=sequential_layers,
        flops_per_sample=meta_flops("mlp"),
    )
)
