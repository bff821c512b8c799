"""The byte tokenizer and builtin:pytext: by-file split, packing, determinism."""

from __future__ import annotations

import pytest
import torch

from roundhouse.config import DataConfig
from roundhouse.data import build_splits
from roundhouse.data.text import (
    EOS_ID,
    VOCAB_SIZE,
    decode,
    encode,
    pack_documents,
    select_files,
    split_by_bytes,
    stdlib_files,
)
from roundhouse.errors import DataError

SMALL = {"seq_len": 32, "max_bytes": 200_000}


def test_tokenizer_round_trips_any_text_and_drops_specials() -> None:
    text = "def f():\n    return 'é'  # ünïcode"
    ids = encode(text, bos=True, eos=True)
    assert ids[-1] == EOS_ID and max(ids) < VOCAB_SIZE
    assert decode(ids) == text
    assert decode(torch.tensor(encode(text))) == text


def test_packing_concatenates_with_eos_and_shifts_targets() -> None:
    inputs, targets = pack_documents([b"abc", b"de"], seq_len=3)
    stream = [97, 98, 99, EOS_ID, 100, 101, EOS_ID]  # 7 tokens -> one chunk of 4
    assert inputs.tolist() == [stream[:3]]
    assert targets.tolist() == [stream[1:4]]
    assert inputs.dtype == torch.int64


def test_split_is_by_file_and_fills_every_split() -> None:
    docs = [bytes([i]) * 100 for i in range(10)]
    train, val, test = split_by_bytes(docs, (0.8, 0.1, 0.1))
    assert train + val + test == docs and len(val) == len(test) == 1
    # One large file cannot leave a split empty.
    train, val, test = split_by_bytes([b"x" * 10_000, b"y", b"z", b"w"], (0.8, 0.1, 0.1))
    assert (len(train), len(val), len(test)) == (1, 1, 2)
    with pytest.raises(DataError, match="max_bytes"):
        split_by_bytes(docs[:2], (0.8, 0.1, 0.1))


def test_stdlib_files_are_sorted_and_exclude_site_packages() -> None:
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert not any("site-packages" in p.parts for p in files)
    chosen = select_files(files, 100_000, seed=0)
    assert sum(len(d) for _, d in chosen) >= 100_000
    assert [p for p, _ in chosen] == [p for p, _ in select_files(files, 100_000, seed=0)]
    assert [p for p, _ in chosen] != [p for p, _ in select_files(files, 100_000, seed=1)]


def test_pytext_splits_are_deterministic_and_shaped_for_language_models() -> None:
    config = DataConfig(source="builtin:pytext", options=SMALL)
    splits = build_splits(config, seed=0)
    assert splits.info.input_shape == (32,) and splits.info.num_classes == VOCAB_SIZE
    assert all(n > 0 for n in splits.info.num_samples.values())
    batch = splits.train.__getitems__([0, 1])
    assert batch["input"].shape == (2, 32) and batch["input"].dtype == torch.int64
    assert torch.equal(batch["input"][:, 1:], batch["target"][:, :-1])
    again = build_splits(config, seed=0)
    assert torch.equal(again.val.inputs, splits.val.inputs)
    assert not torch.equal(build_splits(config, seed=1).val.inputs[:5], splits.val.inputs[:5])


def test_pytext_rejects_unknown_and_bad_options() -> None:
    with pytest.raises(DataError, match="valid options"):
        build_splits(DataConfig(source="builtin:pytext", options={"seqlen": 3}), seed=0)
    with pytest.raises(DataError, match="seq_len"):
        build_splits(DataConfig(source="builtin:pytext", options={"seq_len": 0}), seed=0)
