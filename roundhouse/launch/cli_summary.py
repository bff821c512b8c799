"""`roundhouse models summary NAME[:FLAVOR] [--input SHAPE] [key.sub=value ...]`.

Without `--input` the model is fed its own example (`ModelSpec.example_input`: an 8x8 digit,
or 128 tokens of a 256-byte vocabulary for token models).

The overrides are the job file's `model.*` keys (options, `init_from`, `init_skip`) and
`trainer.freeze` / `trainer.optimizer.param_groups`, so the table shows the model a job with
them would train, including its trainable and frozen counts, and `task.name=...` picks the
task whose `example_inputs` feed the model (a user's task declares its model's inputs there;
by default the model's own task). The model is built on the meta device: nothing is computed
or allocated, so a 124M GPT summarizes in a second. Token models (those whose first layer is an
embedding) get int64 inputs unless the task says otherwise.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from roundhouse.trainer.task_api import ExampleInputs

logger = logging.getLogger(__name__)


def add_summary_arguments(summary: argparse.ArgumentParser) -> None:
    """Add `models summary`'s arguments (model, input shape, classes, overrides)."""
    summary.add_argument("model", metavar="NAME[:FLAVOR]")
    summary.add_argument(
        "--input",
        help="per-sample input shape, e.g. 3x32x32 or 64 (default: the model's own example, "
        "1x8x8 for images, 128 tokens for token models)",
    )
    summary.add_argument(
        "--num-classes",
        type=int,
        help="classes (a language model's vocabulary; default: the model's example, 10 or 256)",
    )
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


def summarize_or_explain(model: nn.Module, ref: str, example: ExampleInputs) -> list:
    """The summary rows of `model` fed `example`; a forward that refuses them is one line.

    Raises:
        ModelError: The model cannot take the task's example inputs.
    """
    from roundhouse import models
    from roundhouse.errors import ModelError

    try:
        return models.summarize(model, (), inputs=example.args)
    except (TypeError, RuntimeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"model {ref} cannot take {example.describe()}: {first}",
            "pass the model's --input shape, or name the task that declares its inputs "
            "(task.name=package.module:Class, its example_inputs)",
        ) from None


def summary_lines(args: argparse.Namespace, shape: tuple[int, ...] | None) -> list[str]:
    """The summary table and the trainable/frozen lines for the parsed command line (`shape`
    None: the model's own example input, `ModelSpec.example_input`)."""
    from roundhouse import models
    from roundhouse.config.loading import apply_overrides, validate_job
    from roundhouse.trainer.adapter_state import apply_adapter_state
    from roundhouse.trainer.optim import group_counts
    from roundhouse.trainer.task import build_job_task, task_name
    from roundhouse.weights.model_build import build_model_for

    name, flavor = models.parse_model_ref(args.model)
    spec = models.get(name)
    shape = shape or spec.example_input
    classes = spec.example_classes if args.num_classes is None else args.num_classes
    data = apply_overrides({"name": "summary", "model": {"name": name, "flavor": flavor}}, [])
    data = apply_overrides(data, list(args.overrides))
    job = validate_job(data, source="models summary")
    with torch.device("meta"):
        model = build_model_for(job, shape, classes)
    task = build_job_task(job)
    example = task.example_inputs(shape, input_dtype(model), 1, "meta")
    rows = summarize_or_explain(model, args.model, example)
    loaded = apply_adapter_state(model, job)  # init_from, freeze, LoRA as the run applies them
    lines = [f"task {task_name(job)}: {example.describe()}"]
    lines.append(models.format_summary(rows, models.count_parameters(model)))
    lines += group_counts(model, job.trainer.optimizer)
    if loaded is not None:
        lines.append(f"init_from {job.model.init_from}: {loaded.loaded} tensors fit")
    return lines
