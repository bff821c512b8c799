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

import inspect
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


LM_TASKS = ("language_model", "masked_lm")  # their outputs are the vocabulary
# Files of a Hugging Face tokenizer: its ids are word pieces, not roundhouse's byte ids.
HF_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "vocab.json", "spiece.model")


def takes_vocab_size(model_name: str) -> bool:
    """True for models whose vocabulary is a builder option apart from `num_classes` (labels)."""
    from roundhouse import models

    return "vocab_size" in inspect.signature(models.get(model_name).builder).parameters


def resolve_build(
    job: JobSpec, options: Mapping[str, Any], num_classes: int, vocab_size: int | None = None
) -> tuple[dict[str, Any], int]:
    """(options, num_classes) to build the job's model with.

    `vocab_size` is the data's token vocabulary (`DataInfo.vocab_size`): a language model's
    outputs are that vocabulary; a text classifier takes it as its `vocab_size` option. A
    Hugging Face `init_from` contributes its config.json's architecture (the job's own
    `model.options` win) and its vocabulary, which must cover the data's.
    """
    from roundhouse import models

    separate = takes_vocab_size(job.model.name)
    if vocab_size is not None and not separate and models.get(job.model.name).loss in LM_TASKS:
        num_classes = vocab_size
    options = dict(options)
    if separate and vocab_size is not None:
        options.setdefault("vocab_size", vocab_size)
    url = job.model.init_from
    if url is None or not pretrained.is_hf_folder(url):
        return options, num_classes
    config = pretrained.read_hf_config(url)
    pretrained.hf_model_type(config, url, job.model.name)
    hf_options, vocab = pretrained.hf_build_options(config)
    data_vocab = options.pop("vocab_size", vocab_size or num_classes) if separate else num_classes
    check_tokenizer(url, vocab, data_vocab)
    if separate:
        return {**hf_options, "vocab_size": vocab, **options}, num_classes
    return {**hf_options, **options}, vocab


def check_tokenizer(url: str, vocab: int, data_vocab: int) -> None:
    """The data's token ids must mean what the Hugging Face folder's ids mean."""
    fs, path = pretrained._fs(url)
    shipped = [name for name in HF_TOKENIZER_FILES if fs.exists(f"{path.rstrip('/')}/{name}")]
    if shipped:
        raise CheckpointError(
            f"model.init_from {url!r} ships its own tokenizer ({shipped[0]}, {vocab} ids); the "
            f"data is roundhouse byte-level text ({data_vocab} ids), so the ids would not match",
            "init_from a model pretrained on byte-level text (a roundhouse MLM/LM run, or a "
            "folder without a tokenizer whose ids are bytes)",
        )
    if data_vocab > vocab:
        raise CheckpointError(
            f"the data's vocabulary ({data_vocab}) is larger than model.init_from's ({vocab})",
            "tokenize the data with the pretrained model's tokenizer",
        )


def fit_to_model(
    model: nn.Module, weights: dict[str, Tensor], skip: list[str], url: str
) -> tuple[dict[str, Tensor], list[str]]:
    """(weights, skip) for a model with fine-tuning heads (see `models.text_heads`).

    Drops the source tensors the model declares it ignores (`ignored_weights`, e.g. the MLM
    head), leaves its `new_heads` freshly initialised when the source has none of them, and
    checks that the token vocabularies agree.
    """
    ignored = tuple(getattr(model, "ignored_weights", ()))
    if ignored:
        weights = {k: v for k, v in weights.items() if not k.startswith(ignored)}
    fresh = [
        f"{prefix}*"
        for prefix in getattr(model, "new_heads", ())
        if not any(k.startswith(prefix) for k in weights)
    ]
    ours, theirs = model.state_dict().get("embed.tok.weight"), weights.get("embed.tok.weight")
    if ours is not None and theirs is not None and ours.shape[0] != theirs.shape[0]:
        raise CheckpointError(
            f"model.init_from {url!r} has a vocabulary of {theirs.shape[0]} tokens, the data "
            f"{ours.shape[0]}: a tokenizer mismatch",
            "fine-tune on data tokenized like the pretraining data (roundhouse text is bytes)",
        )
    return weights, [*skip, *fresh]


def apply_init_from(model: nn.Module, job: JobSpec) -> LoadReport | None:
    """Load `model.init_from` into `model` (None when the job has none)."""
    url = job.model.init_from
    if url is None:
        return None
    weights = read_init_weights(url, job.model.name)
    align = pretrained.ALIGNERS.get(job.model.name)
    if align is not None:
        weights = align(weights, model)
    weights, skip = fit_to_model(model, weights, list(job.model.init_skip), url)
    return pretrained.apply_weights(model, weights, skip, url)


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
