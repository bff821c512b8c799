"""`trainer.distill`: the loss, a frozen teacher from a run or a Hugging Face folder, the
up-front output-space check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from roundhouse.config.loading import validate_job
from roundhouse.data import build_splits
from roundhouse.launch.cli import main
from roundhouse.trainer.distill import distill_loss, load_teacher
from tests.helpers.hf import save_random_gpt2
from tests.helpers.runs import read_metrics
from tests.unit.test_lora import train

STEPS = 4


def digits_job(storage: Path, run_id: str, model: dict, **trainer: object) -> dict:
    return {
        "name": run_id,
        "model": model,
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": STEPS,
            "log_every_steps": 2,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_epoch": False},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": run_id},
    }


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained run of another architecture than the student's (a wider MLP)."""
    storage = tmp_path_factory.mktemp("teacher")
    model = {"name": "mlp", "options": {"hidden_sizes": [96, 48]}}
    return train(digits_job(storage, "teacher", model, max_steps=20))


def test_loss_is_t_squared_kl_of_the_softened_distributions() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    expected = (
        F.kl_div(
            F.log_softmax(student / 3, -1),
            F.log_softmax(teacher / 3, -1),
            reduction="batchmean",
            log_target=True,
        )
        * 9
    )
    torch.testing.assert_close(distill_loss(student, teacher, 3.0, None), expected)
    assert float(distill_loss(teacher, teacher, 3.0, None)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([True, False, True, False, True, False])
    masked = distill_loss(student, teacher, 3.0, mask)
    torch.testing.assert_close(masked, distill_loss(student[mask], teacher[mask], 3.0, None))


def test_a_distilled_student_trains_and_reports_agreement(tmp_path: Path, teacher: Path) -> None:
    distill = {"teacher": str(teacher), "temperature": 2.0, "alpha": 0.7}
    run = train(digits_job(tmp_path, "student", {"name": "mlp"}, distill=distill))
    final = read_metrics(run)[-1]
    assert 0.0 <= final["test/teacher_agreement"] <= 1.0
    assert "test/accuracy" in final
    losses = [m["train/loss"] for m in read_metrics(run) if "train/loss" in m]
    assert losses[-1] < losses[0]


def test_alpha_zero_trains_exactly_like_no_teacher(tmp_path: Path, teacher: Path) -> None:
    distill = {"teacher": str(teacher), "alpha": 0.0}
    with_teacher = train(digits_job(tmp_path, "a", {"name": "mlp"}, distill=distill))
    alone = train(digits_job(tmp_path, "b", {"name": "mlp"}))
    ours = torch.load(with_teacher / "checkpoints/step_4/state.pt", weights_only=True)
    theirs = torch.load(alone / "checkpoints/step_4/state.pt", weights_only=True)
    for key, value in theirs["strategy"]["model"].items():
        torch.testing.assert_close(ours["strategy"]["model"][key], value, rtol=0, atol=0)


def test_teacher_of_another_output_space_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    five = digits_job(tmp_path, "five", {"name": "mlp"}, max_steps=1)
    five["data"] = {
        "source": "builtin:synthetic",
        "options": {"shape": [1, 8, 8], "num_classes": 5, "num_samples": 64},
        "batch_size": 16,
    }
    teacher = train(five)
    job_file = tmp_path / "student.yaml"
    job_file.write_text("name: student\nmodel: {name: mlp}\ndata: {source: builtin:digits}\n")
    storage = tmp_path / "runs"
    code = main(
        [
            "train",
            str(job_file),
            "--local",
            f"trainer.distill={{teacher: {teacher}}}",
            f"storage.path={storage}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "has another output space than the student (5 outputs vs 10)" in err
    assert not storage.exists()


PYTEXT = {"source": "builtin:pytext", "options": {"seq_len": 16, "max_bytes": 100_000}}


def lm_job(storage: Path, teacher: Path) -> dict:
    job = digits_job(storage, "lm", {"name": "gpt"}, max_steps=3)
    job["data"] = {**PYTEXT, "batch_size": 8}
    job["trainer"]["distill"] = {"teacher": str(teacher), "temperature": 2.0, "alpha": 0.5}
    return job


def test_a_hugging_face_gpt2_folder_teaches_a_gpt_student(tmp_path: Path) -> None:
    reference = save_random_gpt2(tmp_path / "gpt2", vocab_size=260)  # the byte vocabulary
    job = lm_job(tmp_path / "runs", tmp_path / "gpt2")
    spec = validate_job(job)
    info = build_splits(spec.data, seed=spec.trainer.seed).info
    teacher = load_teacher(spec, info, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    tokens = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(teacher(tokens), reference(tokens).logits, rtol=0, atol=1e-5)
    final = read_metrics(train(job))[-1]
    assert 0.0 <= final["test/teacher_agreement"] <= 1.0
    assert final["test/loss"] > 0


def test_a_hugging_face_teacher_of_another_vocabulary_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    save_random_gpt2(tmp_path / "gpt2", vocab_size=300)
    capsys.readouterr()  # save_pretrained's progress bar
    job_file = tmp_path / "student.yaml"
    job_file.write_text(
        "name: student\nmodel: {name: gpt}\n"
        "data: {source: builtin:pytext, options: {seq_len: 16, max_bytes: 100000}}\n"
    )
    storage = tmp_path / "runs"
    teacher = f"trainer.distill={{teacher: {tmp_path / 'gpt2'}}}"
    code = main(["train", str(job_file), "--local", teacher, f"storage.path={storage}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "has another output space than the student (300 outputs vs 260)" in err
    assert not storage.exists()
