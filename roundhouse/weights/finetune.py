"""Starting from weights: `model.init_from` and `trainer.freeze`.

Everything here changes the model *before* a strategy sees it, so every strategy gets it the
same way:

- `init_from` copies weights into the freshly built model (a roundhouse run or checkpoint of
  any strategy — their checkpoints hold consolidated weights — or anything
  `weights.pretrained` reads). The run still starts at step 0 with a fresh optimizer, schedule
  and data position; only `--resume` restores those.
- `freeze` sets `requires_grad=False`. Every strategy builds its optimizer, gradient buckets
  (ring), server shards (ps) and engine (DeepSpeed) from the trainable parameters only, so a
  frozen tensor gets no gradient and is never exchanged.

The optimizer's parameter groups (`trainer.optimizer.param_groups`) live in `trainer/optim.py`;
the pre-flight runs both against a model on the meta device before anything is written, so a
missing/corrupt/foreign `init_from` or a glob matching nothing is a one-line error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from roundhouse.config import JobSpec
from roundhouse.errors import CheckpointError, JobFileError
from roundhouse.runs.rundir import RunDir
from roundhouse.weights import pretrained
from roundhouse.weights.checkpoint import CHECKPOINTS, LATEST, MANIFEST, Checkpointer
from roundhouse.weights.pretrained import LoadReport, matches_any

logger = logging.getLogger(__name__)


# --- init_from ------------------------------------------------------------------------------------


def read_run_weights(url: str) -> dict[str, Tensor] | None:
    """Consolidated weights of a run folder (latest) or a `checkpoints/step_N` folder, or None
    when `url` is neither."""
    target = RunDir(url.rstrip("/"))
    step = None
    if target.exists(MANIFEST):
        step = int(target.url.rsplit("_", 1)[-1])
        target = RunDir(target.url.rsplit("/", 2)[0])
    elif not target.exists(CHECKPOINTS, LATEST):
        return None
    state = Checkpointer(target, keep_last=1, identity={}).load(step)
    return dict(state["strategy"]["model"])


def read_init_weights(url: str, model_name: str) -> dict[str, Tensor]:
    """The tensors `url` holds, named as the zoo model `model_name` names them."""
    try:
        weights = read_run_weights(url)
        if weights is not None:
            return weights
        if pretrained.is_hf_folder(url):
            config = pretrained.read_hf_config(url)
            kind = pretrained.hf_model_type(config, url, model_name)
            return pretrained.HF_CONVERTERS[kind](pretrained.read_hf_weights(url))
        return pretrained.read_tensor_file(url)
    except CheckpointError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"model.init_from {url!r} cannot be read: {exc}", "check the path and credentials"
        ) from None


def resolve_build(
    job: JobSpec, options: Mapping[str, Any], num_classes: int
) -> tuple[dict[str, Any], int]:
    """(options, num_classes) to build the job's model with.

    A Hugging Face `init_from` contributes its config.json's architecture (the job's own
    `model.options` win) and its vocabulary, which must cover the data's.
    """
    url = job.model.init_from
    if url is None or not pretrained.is_hf_folder(url):
        return dict(options), num_classes
    config = pretrained.read_hf_config(url)
    pretrained.hf_model_type(config, url, job.model.name)
    hf_options, vocab = pretrained.hf_build_options(config)
    if num_classes > vocab:
        raise CheckpointError(
            f"the data's vocabulary ({num_classes}) is larger than model.init_from's ({vocab})",
            "tokenize the data with the pretrained model's tokenizer",
        )
    return {**hf_options, **options}, vocab


def apply_init_from(model: nn.Module, job: JobSpec) -> LoadReport | None:
    """Load `model.init_from` into `model` (None when the job has none)."""
    url = job.model.init_from
    if url is None:
        return None
    weights = read_init_weights(url, job.model.name)
    align = pretrained.ALIGNERS.get(job.model.name)
    if align is not None:
        weights = align(weights, model)
    return pretrained.apply_weights(model, weights, job.model.init_skip, url)


# --- freezing -------------------------------------------------------------------------------------


def apply_freeze(model: nn.Module, globs: list[str]) -> list[str]:
    """`requires_grad=False` on parameters matching `globs`; returns their names.

    Raises:
        JobFileError: a glob matches no parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    for glob in globs:
        if not any(matches_any(n, [glob]) for n in names):
            raise JobFileError(
                f"trainer.freeze pattern {glob!r} matches no parameter",
                f"parameter names look like {', '.join(names[:3])}; see `roundhouse models "
                "summary`",
            )
    frozen = [n for n, p in model.named_parameters() if matches_any(n, globs)]
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if frozen:
        logger.info("froze %d of %d parameter tensors", len(frozen), len(names))
    return frozen


def apply_finetune(model: nn.Module, job: JobSpec) -> LoadReport | None:
    """`init_from` then `freeze`, in place, before the strategy takes the model."""
    report = apply_init_from(model, job)
    apply_freeze(model, job.trainer.freeze)
    return report
