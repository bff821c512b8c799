"""Text datasets: tokenize, pack with visible document boundaries, stream, train an LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from roundhouse.config import DataConfig
from roundhouse.data import build_splits
from roundhouse.data.streaming import PrepareOptions, WriteConfig, prepare, read_index
from roundhouse.data.streaming.textprep import block_causal_mask, pack_rows, segment_ids
from roundhouse.data.text import EOS_ID, decode
from roundhouse.launch.cli import main

PYTEXT = {"seq_len": 32, "max_bytes": 150_000}
DOCS = ["first document, with some words.", "second one, a little bit longer than that.", "3rd"]


def test_pack_rows_keeps_document_boundaries():
    rows = pack_rows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0)
    # stream 1 2 3 0 4 5 0 6 7 8 9 0 -> rows of 5; the partial last row is dropped
    assert rows.tolist() == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8]]
    assert rows.dtype == np.int32
    tokens = torch.tensor([[1, 2, 0, 4, 5, 0, 7]])
    assert segment_ids(tokens, 0).tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    mask = block_causal_mask(tokens, 0)[0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False]
    assert mask[2].tolist() == [True, True, True, False, False, False, False]  # EOS ends doc 0


def test_prepare_jsonl_with_the_byte_tokenizer(tmp_path: Path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": d, "id": k}) + "\n" for k, d in enumerate(DOCS)))
    url = str(tmp_path / "text")
    args = ["data", "prepare", corpus, url, "--tokenizer", "bytes", "--text-field", "body"]
    assert main([str(a) for a in [*args, "--seq-len", "15", "--no-shuffle"]]) == 0
    index = read_index(url)
    assert index.input.dtype == "int32" and index.input.shape == (16,)
    assert index.extra["eos_id"] == EOS_ID and index.extra["vocab_size"] == 260
    splits = build_splits(
        DataConfig(
            train={"url": url},
            val={"url": url, "split": "train"},
            test={"url": url, "split": "train"},
        ),
        seed=0,
    )
    assert splits.info.input_shape == (15,) and splits.info.num_classes == 260
    rows = splits.datasets["train"].reader.read(np.arange(splits.info.num_samples["train"]))
    assert torch.equal(rows["input"][:, 1:], rows["target"][:, :-1])  # shifted by one
    stream = torch.cat([rows["input"], rows["target"][:, -1:]], dim=1).flatten()
    expected = b"".join(d.encode() + b"\x00" for d in DOCS)  # \x00 stands for EOS here
    got = bytes(0 if t == EOS_ID else t for t in stream.tolist())
    assert expected.startswith(got) and len(got) == 16 * (len(expected) // 16)
    assert main(["data", "inspect", url]) == 0
    assert "tokenizer bytes, vocabulary 260, seq_len 15" in capsys.readouterr().out
    assert main([str(a) for a in [*args[:-2], "--text-field", "nope", "--overwrite"]]) == 2
    assert "field 'nope' is not in" in capsys.readouterr().err


def test_prepared_pytext_holds_the_in_memory_rows(tmp_path: Path):
    url = str(tmp_path / "pytext")
    options = PrepareOptions(source_options=dict(PYTEXT))
    prepare("builtin:pytext", url, options, WriteConfig(block_rows=256))
    streamed = build_splits(DataConfig(train={"url": url}), seed=0)
    memory = build_splits(DataConfig(source="builtin:pytext", options=PYTEXT), seed=0)
    assert streamed.info == memory.info
    for split in ("train", "test"):
        rows = np.arange(streamed.info.num_samples[split])
        batch = streamed.datasets[split].reader.read(rows)
        assert torch.equal(batch["input"], getattr(memory, split).inputs)
        assert torch.equal(batch["target"], getattr(memory, split).targets)
    assert "def" in decode(batch["input"][0]) or len(decode(batch["input"][0])) > 0


def test_hugging_face_tokenizer(tmp_path: Path, capsys):
    corpus = tmp_path / "docs"
    corpus.mkdir()
    for k, doc in enumerate(DOCS * 4):
        (corpus / f"{k}.txt").write_text(doc)
    url = str(tmp_path / "hf")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        args = ["data", "prepare", str(corpus), url, "--tokenizer", "gpt2"]
        assert main(args) == 2
        assert "needs the Hugging Face `tokenizers`" in capsys.readouterr().err
        return
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(DOCS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    args = ["data", "prepare", str(corpus), url, "--tokenizer", str(tmp_path / "tokenizer.json")]
    assert main([*args, "--seq-len", "8"]) == 0
    index = read_index(url)
    assert index.extra["eos_id"] == tok.token_to_id("</s>")
    assert index.extra["vocab_size"] == tok.get_vocab_size()
