"""`--dry-run`: validate a job without training, Ray or a GPU.

Builds the model on the meta device (no memory, no compute), pushes a meta batch through it to
check shapes, and reports the parameter count and the per-rank batch arithmetic.
"""

from __future__ import annotations

import torch

from roundhouse.config import JobSpec
from roundhouse.config.topology import compute_total_steps
from roundhouse.data import build_splits
from roundhouse.errors import ModelError
from roundhouse.launch.checks import check_runnable
from roundhouse.trainer.adapt_checks import check_adaptation
from roundhouse.trainer.finetune import check_finetune, group_counts
from roundhouse.trainer.model_build import build_model_for


def dry_run(job: JobSpec, *, local: bool) -> list[str]:
    """The report lines for `job`; raises a `RoundhouseError` for anything that would fail."""
    topo = check_runnable(job, local=local)
    check_adaptation(job)
    splits = build_splits(job.data, seed=job.trainer.seed)
    info = splits.info
    with torch.device("meta"):
        model = build_model_for(job, info.input_shape, info.num_classes, info.vocab_size)
        out_shape = _output_shape(job, model, info.input_shape, splits.input_dtype)
    num_params = sum(p.numel() for p in model.parameters())
    loaded = check_finetune(job, model)  # init_from, freeze, param_groups (already checked)
    steps_per_epoch = topo.steps_per_epoch(info.num_samples["train"])
    total = compute_total_steps(job, steps_per_epoch)
    return [
        f"job {job.name!r} is valid",
        f"model {job.model.name}:{job.model.flavor}: {num_params:,} parameters, "
        f"input {tuple(info.input_shape)} -> output {tuple(out_shape[1:])}",
        f"data {job.data.source or job.data.train.url}: train {info.num_samples['train']}, "
        f"val {info.num_samples['val']}, test {info.num_samples['test']}",
        f"world {topo.world_size} = {topo.data_parallel} data-parallel x "
        f"{topo.model_parallel} model-parallel ({job.strategy.kind})",
        f"batch: global {topo.global_batch} = {topo.data_parallel} rank(s) x "
        f"{topo.grad_accum_steps} micro-step(s) x {topo.micro_batch_text()} samples per "
        "micro-batch",
        f"steps: {steps_per_epoch} per epoch, {total} in total",
        *group_counts(model, job.trainer.optimizer),
        *(
            [f"init_from {job.model.init_from}: {loaded.loaded} tensors, {loaded.skipped} skipped"]
            if loaded
            else []
        ),
    ]


def _output_shape(
    job: JobSpec, model: torch.nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Size:
    try:
        return model(torch.empty(2, *input_shape, dtype=dtype)).shape
    except (RuntimeError, ValueError) as exc:
        raise ModelError(
            f"model {job.model.name}:{job.model.flavor} cannot take input {tuple(input_shape)}: "
            f"{str(exc).splitlines()[0]}",
            "set data.image_size larger or pick another model/flavor",
        ) from None
