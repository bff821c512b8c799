"""Fine-tuning heads: Hugging Face BERT classifier/tagger parity, init_from an MLM run, the
text-classification metrics, and the one-line errors (labels, positions, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config import JobSpec
from roundhouse.config.loading import validate_job
from roundhouse.data.text import PAD_ID
from roundhouse.errors import CheckpointError, DataError, ModelError
from roundhouse.launch.cli import main
from roundhouse.launch.local import train_local
from roundhouse.trainer.tasks_text import IGNORE_LABEL, TextClassificationTask, f1_metrics
from roundhouse.weights.finetune import apply_init_from
from roundhouse.weights.model_build import build_model_for
from tests.helpers.runs import only_run

transformers = pytest.importorskip("transformers")

HF_CONFIG = {
    "vocab_size": 300,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
    "num_labels": 5,
}


def job_with(name: str, **model: Any) -> JobSpec:
    return validate_job({"name": "ft", "model": {"name": name, "flavor": "debug", **model}})


def load(job: JobSpec, seq_len: int, num_labels: int) -> torch.nn.Module:
    model = build_model_for(job, (seq_len,), num_labels, vocab_size=260)
    apply_init_from(model, job)
    return model.eval()


def save_hf(folder: Path, cls_name: str) -> torch.nn.Module:
    torch.manual_seed(3)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**HF_CONFIG)).eval()
    model.save_pretrained(folder)
    return model


def padded_tokens() -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (3, 24) with right padding in rows 1-2, attention mask); ids are bytes."""
    tokens = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(4))
    tokens[1, 15:] = PAD_ID
    tokens[2, 6:] = PAD_ID
    return tokens, (tokens != PAD_ID).long()


@pytest.mark.parametrize(
    ("zoo", "hf"),
    [
        ("bert_classifier", "BertForSequenceClassification"),
        ("bert_tagger", "BertForTokenClassification"),
    ],
)
def test_hugging_face_heads_give_the_same_logits(tmp_path: Path, zoo: str, hf: str) -> None:
    reference = save_hf(tmp_path, hf)
    ours = load(job_with(zoo, init_from=str(tmp_path)), 24, 5)
    tokens, mask = padded_tokens()
    with torch.no_grad():
        expected, got = reference(tokens, attention_mask=mask).logits, ours(tokens)
    assert got.shape == expected.shape
    if got.dim() == 3:  # padding positions have no label: compare the real tokens
        got, expected = got[mask.bool()], expected[mask.bool()]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_a_masked_lm_folder_leaves_the_head_new_without_init_skip(tmp_path: Path) -> None:
    save_hf(tmp_path, "BertForMaskedLM")
    job = job_with("bert_classifier", init_from=str(tmp_path))
    model = build_model_for(job, (24,), 7, vocab_size=260)
    before = model.classifier.weight.clone()
    report = apply_init_from(model, job)
    assert report is not None and report.skipped == 4  # pooler and classifier weight + bias
    assert torch.equal(model.classifier.weight, before)
    assert model.classifier.out_features == 7


def test_a_folder_with_its_own_tokenizer_is_a_vocabulary_mismatch(tmp_path: Path) -> None:
    save_hf(tmp_path, "BertForMaskedLM")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    with pytest.raises(CheckpointError, match=r"ships its own tokenizer \(vocab\.txt, 300 ids\)"):
        build_model_for(job_with("bert_classifier", init_from=str(tmp_path)), (24,), 5, 260)


def test_a_sequence_longer_than_the_position_table_is_one_error(tmp_path: Path) -> None:
    save_hf(tmp_path, "BertForSequenceClassification")
    with pytest.raises(ModelError, match=r"bert: 64 positions exceed the learned table's 40"):
        build_model_for(job_with("bert_classifier", init_from=str(tmp_path)), (64,), 5, 260)


def test_labels_outside_the_classes_are_one_error() -> None:
    task = TextClassificationTask()
    logits = torch.zeros(2, 4)
    with pytest.raises(DataError, match=r"label 4 is outside the model's 4 classes \(0..3\)"):
        task.loss(logits, {"target": torch.tensor([1, 4])})


def test_macro_f1_and_per_class_figures() -> None:
    task = TextClassificationTask()
    # predictions 0,0,1,2 against labels 0,1,1,2 (and one ignored token)
    logits = torch.eye(3)[[0, 0, 1, 2, 0]] * 5
    target = torch.tensor([0, 1, 1, 2, IGNORE_LABEL])
    sums = {k: float(v) for k, v in task.eval_sums(logits, {"target": target}).items()}
    metrics = task.finalize(sums)
    assert metrics["accuracy"] == pytest.approx(0.75)
    f1 = [2 / 3, 2 / 3, 1.0]  # class 0: P 1/2 R 1; class 1: P 1 R 1/2; class 2: perfect
    assert [metrics[f"class{i}_f1"] for i in range(3)] == pytest.approx(f1)
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3)
    detail = f1_metrics(sums, detail=True)
    assert detail["class1_support"] == 2.0 and detail["class0_precision"] == 0.5


def pydoc_job(tmp_path: Path, name: str, **extra: Any) -> JobSpec:
    model = {"name": name, "flavor": "debug", **extra.pop("model", {})}
    return validate_job(
        {
            "name": name,
            "model": model,
            "data": {
                "source": extra.pop("source", "builtin:pydoc-cls"),
                "options": extra.pop("options", {"seq_len": 32}),
                "batch_size": 32,
                "eval_batch_size": 256,
            },
            "trainer": {"max_steps": 3, "eval_every_steps": 3, "log_every_steps": 3},
            "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
            "storage": {"path": str(tmp_path / "runs")},
        }
    )


def test_bert_mlm_run_fine_tunes_as_a_classifier(tmp_path: Path) -> None:
    # bert as a masked LM on the same docstrings: the data's vocabulary, not its 20 labels
    train_local(pydoc_job(tmp_path, "bert"))
    mlm = only_run(tmp_path / "runs", "bert")
    job = pydoc_job(tmp_path, "bert_classifier", model={"init_from": str(mlm)})
    summary = train_local(job)
    assert 0.0 <= summary["test/accuracy"] <= 1.0
    assert "test/macro_f1" in summary and "test/class19_f1" in summary


def test_gpt_classifier_pools_the_last_real_token() -> None:
    model = build_model_for(job_with("gpt_classifier"), (16,), 3, vocab_size=260).eval()
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    short = tokens.clone()
    short[0, 10:] = PAD_ID
    with torch.no_grad():  # causal: the prefix's last state does not depend on what follows
        torch.testing.assert_close(model(short), model(tokens[:, :10]))


def test_an_mlm_run_of_another_vocabulary_is_refused(tmp_path: Path) -> None:
    weights = build_model_for(job_with("bert"), (16,), 300).state_dict()
    torch.save(weights, tmp_path / "w.pt")
    job = job_with("bert_classifier", init_from=str(tmp_path / "w.pt"))
    model = build_model_for(job, (16,), 5, vocab_size=260)
    with pytest.raises(CheckpointError, match="vocabulary of 300 tokens, the data 260"):
        apply_init_from(model, job)


def test_the_cli_reports_a_tokenizer_mismatch_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_hf(tmp_path / "hf", "BertForMaskedLM")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    code = main(
        [
            "train",
            "configs/bert_classify.yaml",
            "--dry-run",
            "--local",
            f"model.init_from={tmp_path / 'hf'}",
            "model.flavor=debug",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "ships its own tokenizer" in err[0]


def test_a_text_classifier_exports_to_onnx_and_keeps_its_int8_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_local(pydoc_job(tmp_path, "bert_classifier"))
    run = only_run(tmp_path / "runs", "bert_classifier")
    out = tmp_path / "cls.onnx"
    assert (
        main(["export", str(run), "--format", "onnx", "--quantize", "int8", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "the classifier of bert_classifier:debug" in printed and "test accuracy" in printed
    assert out.is_file()


def test_gpt_classifier_loads_a_gpt_lm_without_its_output_map(tmp_path: Path) -> None:
    lm = build_model_for(job_with("gpt"), (16,), 260)
    torch.save(lm.state_dict(), tmp_path / "lm.pt")
    job = job_with("gpt_classifier", init_from=str(tmp_path / "lm.pt"))
    model = build_model_for(job, (16,), 3, vocab_size=260)
    report = apply_init_from(model, job)
    assert report is not None and report.skipped == 1  # score.weight: new
    torch.testing.assert_close(model.head.norm.weight, lm.head.norm.weight)
    torch.testing.assert_close(model.embed.tok.weight, lm.embed.tok.weight)
