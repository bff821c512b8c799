"""Hugging Face models for parity tests, randomly initialised and saved locally (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def save_random_gpt2(folder: Path, vocab_size: int = 300) -> torch.nn.Module:
    """A small random `GPT2LMHeadModel` (seed 0), `save_pretrained` to `folder`, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model
