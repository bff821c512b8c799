"""What the built-in generative tasks draw for `roundhouse sample` (`Task.sample_output`).

- diffusion: DDPM/DDIM with classifier-free guidance, conditioned on `--class`, on `--prompt`
  (a text-conditioned model) or on the classes in turn;
- VAE: decodes latent codes drawn from the prior;
- language model: the prompt and its continuation (temperature, top-k; temperature 0 is greedy);
- seq2seq: the decoded target of `--prompt` (greedy, or a beam search of width `--beam`).

Every out-of-range flag is a `TaskError`, one line at exit 2 before anything is written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from roundhouse.trainer.task_api import SampleRequest, TaskError

DIFFUSION_OPTIONS = frozenset({"num", "sampler", "steps", "eta", "guidance", "class_label"})
LM_OPTIONS = frozenset({"prompt", "max_new_tokens", "temperature", "top_k"})
SEQ2SEQ_OPTIONS = frozenset({"prompt", "max_new_tokens", "beam"})


def image_count(request: SampleRequest) -> int:
    """`--num` (default 64), at least 1."""
    num = 64 if request.num is None else request.num
    if num < 1:
        raise TaskError(f"--num {num} must be >= 1", "e.g. --num 64")
    return num


def vae_images(model: nn.Module, request: SampleRequest) -> Tensor:
    """`--num` images decoded from the VAE's prior."""
    generator = torch.Generator().manual_seed(request.seed)
    return model.sample(image_count(request), generator=generator)


def diffusion_images(model: nn.Module, request: SampleRequest) -> Tensor:
    """`--num` images from a diffusion model (`DiffusionModel.sample`)."""
    from roundhouse.models.diffusion import SamplerConfig

    num = image_count(request)
    config = SamplerConfig(
        sampler=request.sampler or "ddim",
        num_steps=request.steps if request.steps is not None else 50,
        eta=request.eta if request.eta is not None else 0.0,
        guidance=request.guidance if request.guidance is not None else 3.0,
    )
    cond = sample_conditions(model, request, num)
    return model.sample(num, config, cond, torch.Generator().manual_seed(request.seed))


def sample_conditions(model: Any, request: SampleRequest, num: int) -> Tensor | None:
    """The condition of each sample: `--class`, `--prompt`, or the classes in turn."""
    from roundhouse.models.diffusion.conditioning import class_caption, encode_captions

    kind, num_classes = model.condition, model.cond_encoder.num_classes
    label = request.class_label
    if kind == "none":
        if label is not None:
            raise TaskError("--class given, but the model is unconditional", "remove --class")
        return None
    if label is not None and not 0 <= label < num_classes:
        raise TaskError(
            f"--class {label} is not a class of this model", f"pick 0..{num_classes - 1}"
        )
    per_row = math.ceil(math.sqrt(num))
    labels = [label if label is not None else (i // per_row) % num_classes for i in range(num)]
    if kind == "class":
        return torch.tensor(labels, dtype=torch.long)
    texts = [request.prompt if request.prompt is not None else class_caption(y) for y in labels]
    return encode_captions(texts, 16)


def lm_text(model: nn.Module, request: SampleRequest) -> str:
    """The prompt and its continuation, decoded from bytes."""
    from roundhouse.data.text import EOS_ID, decode, encode
    from roundhouse.models.gpt import GPT, pick_next_token

    prompt = request.prompt if request.prompt is not None else ""
    max_new = request.max_new_tokens if request.max_new_tokens is not None else 200
    temperature = request.temperature if request.temperature is not None else 0.8
    top_k = request.top_k
    if max_new < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise TaskError(
            "--max-new-tokens and --temperature must be >= 0, --top-k >= 1", "fix the flag"
        )
    # Training streams separate files with EOS, so EOS + prompt reads as the start of a file.
    ids = torch.tensor([[EOS_ID, *encode(prompt)]], dtype=torch.long)
    generator = torch.Generator().manual_seed(request.seed)
    if isinstance(model, GPT):
        out = model.generate(
            ids, max_new, temperature=temperature, top_k=top_k, generator=generator
        )
    else:  # any (B, T) -> (B, T, V) model: re-run the whole sequence each step
        out = ids
        with torch.no_grad():
            for _ in range(max_new):
                logits = model(out)[:, -1]
                out = torch.cat([out, pick_next_token(logits, temperature, top_k, generator)], 1)
    return decode(out[0])


def seq2seq_text(model: nn.Module, request: SampleRequest, job: Any) -> str:
    """The decoded target of `--prompt` (cut to the run's source length), in the tokenizer of
    the run's data (bytes unless `tokenizer: words`): greedy (`--beam 1`, the default) or the
    best of a beam search, at most `--max-new-tokens` tokens (default 64)."""
    from roundhouse.data.pydoc_corpus import (
        encode_padded,
        pairs_decoder,
        pairs_encoder,
        pairs_tokenizer,
    )

    options = dict(job.data.options)
    tokenizer = pairs_tokenizer(options, job.data.source)
    beam = 1 if request.beam is None else request.beam
    if beam < 1:
        raise TaskError(f"--beam {beam}: the beam width must be >= 1", "pass --beam 1 or more")
    max_len = request.max_new_tokens if request.max_new_tokens is not None else 64
    if max_len < 1:
        raise TaskError("--max-new-tokens must be >= 1", "fix the flag")
    src_len = int(options.get("src_len", 64))
    src = encode_padded([request.prompt or ""], src_len, pairs_encoder(tokenizer))
    ids = model.greedy(src, max_len)[0] if beam == 1 else model.beam_search(src, max_len, beam=beam)
    return pairs_decoder(tokenizer)(ids.tolist())
