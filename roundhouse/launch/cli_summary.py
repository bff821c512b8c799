"""`roundhouse models summary NAME[:FLAVOR] --input SHAPE [key.sub=value ...]`.

The overrides are the job file's `model.*` keys (options, `init_from`, `init_skip`) and
`trainer.freeze` / `trainer.optimizer.param_groups`, so the table shows the model a job with
them would train, including its trainable and frozen counts. The model is built on the meta
device: nothing is computed or allocated, so a 124M GPT summarizes in a second. Token models
(those whose first layer is an embedding) get an int64 input.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def add_summary_arguments(summary: argparse.ArgumentParser) -> None:
    """Add `models summary`'s arguments (model, input shape, classes, overrides)."""
    summary.add_argument("model", metavar="NAME[:FLAVOR]")
    summary.add_argument("--input", default="1x8x8", help="per-sample input shape, e.g. 3x32x32")
    summary.add_argument("--num-classes", type=int, default=10)
    summary.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="model.* keys as in a job file (model.options.dim=128, model.init_from=PATH), "
        "trainer.freeze, trainer.optimizer.param_groups",
    )


def input_dtype(model: nn.Module) -> torch.dtype:
    """int64 for models whose first parameterized layer is an embedding (token inputs)."""
    for module in model.modules():
        if list(module.parameters(recurse=False)):
            return torch.long if isinstance(module, nn.Embedding) else torch.float32
    return torch.float32


def summary_lines(args: argparse.Namespace, shape: tuple[int, ...]) -> list[str]:
    """The summary table and the trainable/frozen lines for the parsed command line."""
    from roundhouse import models
    from roundhouse.config.loading import apply_overrides, validate_job
    from roundhouse.trainer.checks import check_finetune
    from roundhouse.trainer.optim import group_counts
    from roundhouse.weights.model_build import build_model_for

    name, flavor = models.parse_model_ref(args.model)
    data = apply_overrides({"name": "summary", "model": {"name": name, "flavor": flavor}}, [])
    data = apply_overrides(data, list(args.overrides))
    job = validate_job(data, source="models summary")
    with torch.device("meta"):
        model = build_model_for(job, shape, args.num_classes)
    loaded = check_finetune(job, model)
    rows = models.summarize(model, shape, input_dtype(model))
    lines = [models.format_summary(rows, models.count_parameters(model))]
    lines += group_counts(model, job.trainer.optimizer)
    if loaded is not None:
        lines.append(f"init_from {job.model.init_from}: {loaded.loaded} tensors fit")
    return lines
