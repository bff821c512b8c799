"""Hugging Face model folders as distillation teachers (`trainer.distill.teacher`).

A folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`), as
`save_pretrained` writes it, of a GPT-2 (`model_type: gpt2`) or BERT (`model_type: bert`)
model teaches a `gpt` or `bert` student. `weights.pretrained` reads it exactly as
`model.init_from` does: config.json gives the zoo model's architecture
(`hf_build_options`), the weights are renamed onto the zoo's names (GPT-2's Conv1D weights
transposed), and every tensor must fit.

The teacher's output space is its vocabulary. `check_hf_teacher` compares it, the task (causal
vs masked language model) and the longest sequence the teacher's position table holds with
the student's, up front, from config.json alone (no weights read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.errors import CheckpointError, JobFileError
from roundhouse.models.spec import DEFAULT_FLAVOR
from roundhouse.weights import pretrained

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HFTeacher:
    """What config.json says about a Hugging Face teacher folder."""

    url: str
    kind: str  # config.json model_type: gpt2 or bert
    model_name: str  # the zoo model it loads into: gpt or bert
    options: dict[str, Any]
    vocab: int

    @property
    def max_len(self) -> int:
        """The longest sequence its learned position table covers."""
        return int(self.options["max_len"])


def is_hf_teacher(url: str) -> bool:
    """True when `url` is a Hugging Face model folder (it has a `config.json`)."""
    try:
        return pretrained.is_hf_folder(url)
    except (OSError, ValueError):
        return False


def read_hf_teacher(url: str) -> HFTeacher:
    """The teacher folder's config.json; a model type roundhouse cannot build is an error."""
    config = pretrained.read_hf_config(url)
    kind = config.get("model_type")
    if kind not in pretrained.HF_MODELS:
        raise JobFileError(
            f"trainer.distill.teacher {url!r} is a Hugging Face {kind!r} model",
            f"Hugging Face teachers are {' or '.join(pretrained.HF_MODELS)} folders",
        )
    options, vocab = pretrained.hf_build_options(config)
    return HFTeacher(url, kind, pretrained.HF_MODELS[kind], options, vocab)


def check_hf_teacher(
    job: JobSpec, teacher: HFTeacher, outputs: int, input_shape: tuple[int, ...]
) -> None:
    """The teacher has the student's task, `outputs` logits and room for its sequences."""
    ours, theirs = models.get(job.model.name).loss, models.get(teacher.model_name).loss
    mismatch = []
    if theirs != ours:
        mismatch.append(f"task {theirs} vs {ours}")
    if teacher.vocab != outputs:
        mismatch.append(f"{teacher.vocab} outputs vs {outputs}")
    if theirs == ours and input_shape and input_shape[0] > teacher.max_len:
        mismatch.append(f"at most {teacher.max_len} positions vs sequences of {input_shape[0]}")
    if mismatch:
        raise JobFileError(
            f"trainer.distill.teacher {teacher.url!r} has another output space than the "
            f"student ({', '.join(mismatch)})",
            "distil from a model with the student's task, vocabulary and sequence length",
        )


def build_hf_teacher(teacher: HFTeacher) -> nn.Module:
    """The zoo model config.json describes, with the folder's weights (every tensor must fit)."""
    config = models.BuildConfig(
        flavor=DEFAULT_FLAVOR,
        input_shape=(teacher.max_len,),
        num_classes=teacher.vocab,
        options=teacher.options,
    )
    model = models.build_model(teacher.model_name, config)
    try:
        weights = pretrained.HF_CONVERTERS[teacher.kind](pretrained.read_hf_weights(teacher.url))
        pretrained.apply_weights(model, weights, [], teacher.url)
    except CheckpointError as exc:  # its messages name model.init_from, the usual reader
        raise CheckpointError(
            exc.what.replace("model.init_from", "trainer.distill.teacher"), exc.fix
        ) from None
    return model
