"""`roundhouse sample RUN --prompt "def dumps(obj):"` for a `seq2seq` run: the decoded target.

The prompt is the source (a signature line for `builtin:pydoc-pairs`), cut to the run's source
length; the output is the greedy decode (`--beam 1`, the default) or the best of a beam search
(`--beam N`), at most `--max-new-tokens` tokens (default: the run's target length).
"""

from __future__ import annotations

import argparse

import torch

from roundhouse.errors import JobFileError

SEQ2SEQ_FLAGS = ("prompt", "max_new_tokens", "beam")


def sample_seq2seq(
    model: torch.nn.Module,
    args: argparse.Namespace,
    src_len: int,
    options: dict | None = None,
    source: str = "builtin:pydoc-pairs",
) -> str:
    """The decoded text for `--prompt` (greedy, or a beam search of width `--beam`), in the
    tokenizer of the run's data (`options`: its `data.options`; bytes unless `tokenizer:
    words`)."""
    from roundhouse.data.pydoc_corpus import (
        encode_padded,
        pairs_decoder,
        pairs_encoder,
        pairs_tokenizer,
    )

    tokenizer = pairs_tokenizer(dict(options or {}), source)

    beam = 1 if args.beam is None else args.beam
    if beam < 1:
        raise JobFileError(f"--beam {beam}: the beam width must be >= 1", "pass --beam 1 or more")
    max_len = args.max_new_tokens if args.max_new_tokens is not None else 64
    if max_len < 1:
        raise JobFileError("--max-new-tokens must be >= 1", "fix the flag")
    src = encode_padded([args.prompt or ""], src_len, pairs_encoder(tokenizer))
    if beam == 1:
        ids = model.greedy(src, max_len)[0]
    else:
        ids = model.beam_search(src, max_len, beam=beam)
    return pairs_decoder(tokenizer)(ids.tolist())


def reject_other_flags(args: argparse.Namespace, flags: dict[str, str], name: str) -> None:
    """A one-line error for a sampling flag a seq2seq model has no use for."""
    given = [
        flag
        for attr, flag in flags.items()
        if attr not in SEQ2SEQ_FLAGS and getattr(args, attr, None) is not None
    ]
    if given:
        raise JobFileError(f"{', '.join(given)}: not for seq2seq model {name}", "remove them")
    if not args.prompt:
        raise JobFileError(f"seq2seq model {name} needs --prompt (the source)", "pass --prompt")
