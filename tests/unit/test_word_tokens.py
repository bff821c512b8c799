"""`WordPieces`: byte-fallback word pieces from a training split, and `builtin:pydoc-pairs` /
`builtin:pydoc-text` with them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from roundhouse.config import DataConfig
from roundhouse.config.loading import validate_job
from roundhouse.data.pydoc_corpus import load_pydoc_text, pairs_tokenizer, pydoc_pairs
from roundhouse.data.pydoc_corpus import stdlib_docstrings as records
from roundhouse.data.sources import build_source_splits
from roundhouse.data.text import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE
from roundhouse.data.unicode_pairs import unicode_pairs
from roundhouse.data.word_tokens import FIRST_PIECE_ID, WordPieces, split_pieces
from roundhouse.errors import DataError
from roundhouse.launch.cli import main
from roundhouse.launch.local import train_local
from roundhouse.trainer.tasks_seq2seq import texts
from tests.helpers.runs import only_run


def test_pieces_concatenate_back_to_the_text() -> None:
    text = "Return getAll(x) for HTTPServer_2, naïve  ok."
    pieces = split_pieces(text)
    assert "".join(pieces) == text
    assert pieces[:4] == ["Return", " get", "All", "("]
    assert " HTTP" in pieces and "Server" in pieces and "_" in pieces and " na" in pieces


def test_known_pieces_are_one_id_and_the_rest_fall_back_to_bytes() -> None:
    tok = WordPieces.build(["Return the x.", "Return the y.", "Set it."], min_count=2)
    assert tok.pieces == (" the", "Return")  # ties by text; single bytes are never learned
    assert tok.vocab_size == VOCAB_SIZE + 2
    ids = tok.encode("Return the zebra.")
    assert ids[:2] == [FIRST_PIECE_ID + 1, FIRST_PIECE_ID]
    assert ids[2:] == list(b" zebra.")
    assert tok.decode(ids) == "Return the zebra."
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, 10**6]) == "Return the zebra."
    assert tok.fingerprint != WordPieces.build(["Set it.", "Set it."]).fingerprint


def test_the_vocabulary_comes_from_the_training_split_and_round_trips_every_test_text() -> None:
    tok = pairs_tokenizer({"tokenizer": "words"})
    assert tok is not None and tok is pairs_tokenizer({"tokenizer": "words", "min_count": 2})
    train, _, test = pydoc_pairs(records())
    rebuilt = WordPieces.build([t for pair in train for t in pair], min_count=2)
    assert rebuilt.pieces == tok.pieces  # deterministic, from train only
    for source, target in test:
        assert tok.decode(tok.encode(source)) == source
        assert tok.decode(tok.encode(target)) == target
    lengths = [len(tok.encode(t)) / len(t.encode()) for _, t in test]
    assert sum(lengths) / len(lengths) < 0.5  # far fewer ids than bytes


def test_pydoc_pairs_with_words_reports_its_vocabulary_and_the_task_decodes_it() -> None:
    config = DataConfig(
        source="builtin:pydoc-pairs", options={"tokenizer": "words", "src_len": 24, "tgt_len": 12}
    )
    splits = build_source_splits(config, seed=0)
    tok = pairs_tokenizer({"tokenizer": "words"})
    assert splits.info.vocab_size == splits.info.num_classes == tok.vocab_size
    target = splits.test[[0, 1, 2, 3]]["target"]
    assert int(target.max()) >= FIRST_PIECE_ID and (target[:, 0] == BOS_ID).all()
    _, _, test = pydoc_pairs(records())
    decoded = texts(target[:, 1:], tok.decode)
    for text, (_, reference) in zip(decoded, test[:4], strict=True):
        assert reference.startswith(text) and text
    with pytest.raises(DataError, match="tokenizer must be one of bytes, words"):
        build_source_splits(
            DataConfig(source="builtin:pydoc-pairs", options={"tokenizer": "bpe"}), 0
        )


def test_pydoc_text_is_a_byte_lm_corpus_with_a_fixed_split() -> None:
    full = load_pydoc_text({"seq_len": 64})
    few = load_pydoc_text({"seq_len": 64, "fraction": 0.1})
    assert [x.shape[1] for x, _ in full] == [64, 64, 64]
    assert 0.05 < few[0][0].shape[0] / full[0][0].shape[0] < 0.15
    for (a, b), (c, d) in zip(full[1:], few[1:], strict=True):  # val and test stay whole
        assert torch.equal(a, c) and torch.equal(b, d)
    inputs, targets = full[0]
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


def test_a_word_piece_run_trains_reports_bleu_and_samples_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = validate_job(
        {
            "name": "s2s_words",
            "model": {"name": "seq2seq", "flavor": "debug"},
            "data": {
                "source": "builtin:pydoc-pairs",
                "options": {"src_len": 24, "tgt_len": 12, "tokenizer": "words"},
                "batch_size": 16,
                "eval_batch_size": 512,
            },
            "trainer": {"max_steps": 2, "eval_every_steps": 2, "log_every_steps": 2},
            "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
            "storage": {"path": str(tmp_path)},
        }
    )
    summary = train_local(job)
    assert 0.0 <= summary["test/bleu"] <= 100.0
    run = only_run(tmp_path, "s2s_words")
    assert main(["sample", str(run), "--prompt", "def get_name(self):", "--beam", "2"]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) <= 1 and "\ufffd" not in printed  # whole pieces, not bytes


def test_unicode_pairs_are_names_to_decomposition_names_with_a_fixed_split() -> None:
    train, val, test = unicode_pairs()
    assert len(train) > 3000 and len(val) > 300 and len(test) > 300
    every = dict(pair for part in (train, val, test) for pair in part)
    assert (
        every["LATIN SMALL LETTER E WITH ACUTE"] == "LATIN SMALL LETTER E + COMBINING ACUTE ACCENT"
    )
    assert every["CIRCLED DIGIT ONE"] == "<circle> DIGIT ONE"
    assert not any(name.startswith("HANGUL SYLLABLE") for name in every)
    names = [{s for s, _ in part} for part in (train, val, test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    config = DataConfig(
        source="builtin:unicode-pairs", options={"tokenizer": "words", "src_len": 8, "tgt_len": 8}
    )
    splits = build_source_splits(config, seed=0)
    tok = pairs_tokenizer({"tokenizer": "words"}, "builtin:unicode-pairs")
    assert tok is not None and splits.info.vocab_size == tok.vocab_size < 2000
    assert splits.info.num_samples == {"train": len(train), "val": len(val), "test": len(test)}


def test_init_from_a_byte_run_into_word_pieces_is_refused_in_preflight(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = {
        "name": "s2s_bytes",
        "model": {"name": "seq2seq", "flavor": "debug"},
        "data": {"source": "builtin:unicode-pairs", "options": {"src_len": 8, "tgt_len": 8}},
        "trainer": {"max_steps": 1, "log_every_steps": 1},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(tmp_path)},
    }
    train_local(validate_job(job))
    job["model"]["init_from"] = str(only_run(tmp_path, "s2s_bytes"))
    job["data"]["options"]["tokenizer"] = "words"
    path = tmp_path / "words.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path), "--local", "--dry-run"]) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err
