"""`roundhouse export`: safetensors and ONNX (checked with onnxruntime), int8, LoRA merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from roundhouse import models
from roundhouse.launch.cli import main
from tests.unit.test_distill import digits_job
from tests.unit.test_lora import LORA, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("runs")
    return train(digits_job(storage, "mlp", {"name": "mlp", "flavor": "small"}, max_steps=30))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("lora")
    return train(digits_job(storage, "lora", {"name": "mlp", "lora": LORA}, max_steps=6))


def export(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_onnx_matches_pytorch_at_any_batch_size(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m.onnx"
    code, text, _ = export(capsys, trained, "--format", "onnx", "--out", out)
    assert code == 0, text
    assert "max abs difference to PyTorch" in text
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
        assert session.run(None, {"input": x})[0].shape == (batch, 10)


def test_int8_is_smaller_and_keeps_the_accuracy(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m.int8.onnx"
    code, text, _ = export(capsys, trained, "--format", "onnx", "--quantize", "int8", "--out", out)
    assert code == 0, text
    fp32_line = next(line for line in text.splitlines() if line.startswith("onnx:"))
    fp32_bytes = int(fp32_line.rsplit(", ", 1)[1].split()[0].replace(",", ""))
    assert out.stat().st_size <= 0.35 * fp32_bytes
    accuracy = next(line for line in text.splitlines() if line.startswith("test accuracy"))
    before, after = (float(part.split()[-1]) for part in accuracy.split("->"))
    assert before > 0.5 and abs(before - after) <= 0.02


def test_lora_run_exports_merged_weights_that_plain_pytorch_loads(
    lora_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "merged.safetensors"
    code, text, _ = export(capsys, lora_run, "--merge-lora", "--out", out)
    assert code == 0, text
    model = models.build_model(
        "mlp", models.BuildConfig(flavor="debug", input_shape=(1, 8, 8), num_classes=10)
    )
    model.load_state_dict(load_file(str(out)))  # every name and shape is the plain model's
    unmerged = tmp_path / "adapters.safetensors"
    assert export(capsys, lora_run, "--out", unmerged)[0] == 0
    assert any(".lora_A." in k for k in load_file(str(unmerged)))


def test_ckpt_export_is_an_alias(trained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "w.safetensors"
    assert main(["ckpt", "export", str(trained), "--to", str(out)]) == 0
    state = torch.load(trained / "checkpoints/step_30/state.pt", weights_only=True)
    assert load_file(str(out)).keys() == state["strategy"]["model"].keys()


@pytest.mark.parametrize(
    ("job", "kind"),
    [("vae_digits.yaml", "the decoder of vae"), ("ddpm_digits.yaml", "the denoiser of ddpm")],
)
def test_generative_models_export_their_decoder_or_denoiser(
    job: str, kind: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = Path(__file__).parents[2] / "configs" / job
    text = config.read_text().replace("flavor: small", "flavor: debug")
    job_file = tmp_path / job
    job_file.write_text(text)
    code, out, err = export(capsys, job_file, "--format", "onnx", "--out", tmp_path / "g.onnx")
    assert code == 0, err
    assert kind in out


def test_fasttext_exports_to_onnx(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The sparse model's bag (an EmbeddingBag with a padding row) exports as a gather and a
    masked mean; the export's own onnxruntime check compares it with PyTorch."""
    job_file = tmp_path / "ft.yaml"
    job_file.write_text(
        "name: ft\nmodel: {name: fasttext, flavor: debug}\ndata: {source: builtin:pydoc-cls}\n"
    )
    code, out, err = export(capsys, job_file, "--format", "onnx", "--out", tmp_path / "f.onnx")
    assert code == 0, err
    assert "the classifier of fasttext:debug" in out


def test_unsupported_op_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        "name: spectral\nmodel: {name: 'tests.helpers.models:spectral_net'}\n"
        "data: {source: builtin:digits}\n"
    )
    out = tmp_path / "x.onnx"
    code, text, err = export(capsys, job_file, "--format", "onnx", "--out", out)
    assert code == 2 and text == ""
    assert err.startswith("error: model tests.helpers.models:spectral_net cannot be exported")
    assert "svdvals" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_int8_safetensors_is_one_line_and_writes_nothing(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m.int8.safetensors"
    args = ("--format", "safetensors", "--quantize", "int8", "--out", out)
    code, text, err = export(capsys, trained, *args)
    assert code == 2 and text == ""
    assert err.strip() == (
        "error: --quantize int8 writes an ONNX file (onnxruntime dynamic quantization) "
        "(add --format onnx)"
    )
    assert not out.exists()
