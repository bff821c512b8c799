"""`seq2seq`: causal decoder, source padding, teacher forcing that learns, greedy vs beam,
additive BLEU, builtin:pydoc-pairs, `roundhouse sample` and the two-file ONNX export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roundhouse import models
from roundhouse.config import LossConfig
from roundhouse.config.loading import validate_job
from roundhouse.data.pydoc_corpus import encode_padded, encode_targets, first_sentence
from roundhouse.data.text import BOS_ID, EOS_ID, PAD_ID
from roundhouse.errors import ModelError
from roundhouse.launch.cli import main
from roundhouse.launch.local import train_local
from roundhouse.trainer.task import build_task
from roundhouse.trainer.tasks_seq2seq import bleu_from_stats, bleu_stats
from tests.helpers.runs import only_run

# BLEU counts up to 4-grams: each summary has at least four words.
PAIRS = [
    ("def a(x):", "Add one to x."),
    ("def b(y):", "Bake y for me."),
    ("def c():", "Cut it in two."),
]


def build(**options: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = models.BuildConfig(input_shape=(12,), num_classes=260, options=options)
    return models.build_model("seq2seq", config)


def batch() -> dict[str, torch.Tensor]:
    return {
        "input": encode_padded([s for s, _ in PAIRS], 12),
        "target": encode_targets([t for _, t in PAIRS], 16),
    }


@pytest.mark.parametrize("positions", ["sinusoidal", "rope"])
def test_the_decoder_is_causal_and_source_padding_is_ignored(positions: str) -> None:
    model = build(positions=positions).eval()
    data = batch()
    src, tgt = data["input"], data["target"][:, :-1]
    with torch.no_grad():
        logits = model(src, tgt)
        changed = tgt.clone()
        changed[:, 5:] = 7  # the future of position 4
        torch.testing.assert_close(model(src, changed)[:, :5], logits[:, :5])
        longer = torch.cat([src, torch.full((3, 4), PAD_ID)], dim=1)  # more padding
        torch.testing.assert_close(model(longer, tgt), logits, atol=1e-5, rtol=0)


def test_teacher_forcing_learns_the_pairs_and_greedy_and_beam_decode_them() -> None:
    model, task, data = build(num_decoder_layers=1), build_task("seq2seq", LossConfig()), batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = task.loss(task.forward(model, data), data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    sums = task.eval_sums(task.forward(model, data), data)
    metrics = task.finalize({k: float(v) for k, v in sums.items()})
    assert task.decoded == [t for _, t in PAIRS]
    assert metrics["bleu"] == pytest.approx(100.0) and metrics["accuracy"] == 1.0
    beam = model.beam_search(data["input"][:1], 16, beam=3)
    assert beam.tolist() == [*PAIRS[0][1].encode(), EOS_ID]


def test_beam_of_one_is_greedy_and_a_beam_below_one_is_an_error() -> None:
    model, src = build().eval(), batch()["input"][1:2]
    greedy = model.greedy(src, 8)[0]
    assert model.beam_search(src, 8, beam=1).tolist() == greedy[greedy != PAD_ID].tolist()
    with pytest.raises(ModelError, match="beam width must be >= 1, got 0"):
        model.beam_search(src, 8, beam=0)


def test_bleu_statistics_add_up_to_the_corpus_bleu() -> None:
    hyps = ["Return the cat.", "Open a file now", "Close it."]
    refs = ["Return the dog.", "Open the file.", "Close it."]
    parts = [bleu_stats(hyps[:1], refs[:1]), bleu_stats(hyps[1:], refs[1:])]
    summed = {k: parts[0][k] + parts[1][k] for k in parts[0]}
    from sacrebleu.metrics import BLEU

    assert bleu_from_stats(summed) == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)


def test_first_sentence_and_target_framing() -> None:
    doc = "Serialize obj to a JSON\nformatted str. More here.\n\nDetails."
    assert first_sentence(doc) == "Serialize obj to a JSON formatted str."
    ids = encode_targets(["abcdef"], 4)[0].tolist()
    assert ids == [BOS_ID, *b"abc", EOS_ID]  # cut to leave room for EOS


@pytest.fixture(scope="module")
def s2s_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("runs")
    job = validate_job(
        {
            "name": "s2s",
            "model": {"name": "seq2seq", "flavor": "debug"},
            "data": {
                "source": "builtin:pydoc-pairs",
                "options": {"src_len": 32, "tgt_len": 16},
                "batch_size": 16,
                "eval_batch_size": 512,
            },
            "trainer": {"max_steps": 2, "eval_every_steps": 2, "log_every_steps": 2},
            "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
            "storage": {"path": str(storage)},
        }
    )
    summary = train_local(job)
    assert 0.0 <= summary["test/bleu"] <= 100.0 and "val/bleu" in summary
    return only_run(storage, "s2s")


def test_sample_prints_the_decoded_docstring_line(
    s2s_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["sample", str(s2s_run), "--prompt", "def dumps(obj):", "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) <= 1
    assert main(["sample", str(s2s_run), "--prompt", "def dumps(obj):", "--beam", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --beam 0: the beam width")


def test_onnx_export_writes_the_encoder_and_the_decoder_step(
    s2s_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s2s.onnx"
    assert main(["export", str(s2s_run), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the seq2seq encoder" in printed and "the seq2seq decoder step" in printed
    assert (tmp_path / "s2s.encoder.onnx").is_file() and (tmp_path / "s2s.decoder.onnx").is_file()
    assert not out.exists()
