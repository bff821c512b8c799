"""Which parameters get sparse gradients, asked of a built model or of a job's model options.

An `nn.Embedding` or `nn.EmbeddingBag` built with `sparse=True` gives its weight a sparse
gradient holding only the rows its input looked up. Strategies treat such weights as *row
tables* (`roundhouse.parallel.ps.rows`); optimizers must accept sparse gradients. A model
family whose builder takes a `sparse` argument (fasttext) is taken to make sparse gradients
when it is true, so the launcher's checks can refuse a job without building the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from roundhouse.models.registry import get

ROW_MODULES = (nn.Embedding, nn.EmbeddingBag)
SPARSE_OPTIMIZERS = ("sgd", "adagrad", "lazy_adam")  # those that step on sparse gradients


def sparse_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose weight gets sparse gradients (`sparse=True` embeddings that train)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, ROW_MODULES) and m.sparse and m.weight.requires_grad
    ]


def has_sparse_gradients(model: nn.Module) -> bool:
    """Whether backward gives any parameter of `model` a sparse gradient."""
    return bool(sparse_modules(model))


def wants_sparse_gradients(name: str, flavor: str, options: Mapping[str, Any]) -> bool:
    """Whether the registered model `name` (flavor, options) is built with `sparse=True`."""
    try:
        spec = get(name)
    except Exception:  # adapters that cannot be imported here are checked elsewhere
        return False
    param = inspect.signature(spec.builder).parameters.get("sparse")
    if param is None:
        return False
    kwargs = {**spec.flavors.get(flavor, {}), **options}
    default = param.default if param.default is not inspect.Parameter.empty else False
    return bool(kwargs.get("sparse", default))
