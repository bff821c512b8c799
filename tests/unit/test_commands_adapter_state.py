"""Commands that rebuild a job's model apply its adapter state and export path (issue 32, item 7):
RoPE GPT to ONNX, `sample` on a LoRA run, LoRA counts in `--dry-run` and `models summary`,
`export JOB.yaml` with a Hugging Face `init_from`."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from roundhouse.config.loading import load_job
from roundhouse.launch.cli import main
from roundhouse.weights.saved_model import build_job_model, load_saved_model
from tests.helpers.hf import save_random_gpt2
from tests.unit.test_lora import train

PYTEXT = {"source": "builtin:pytext", "options": {"seq_len": 16, "max_bytes": 60_000}}
GPT_LORA = {"rank": 4, "alpha": 8.0, "targets": ["blocks.*.attn.*_proj", "blocks.*.ffn.fc*"]}
COUNTS = re.compile(r"trainable ([\d,]+), frozen ([\d,]+) parameters")


def gpt_job(storage: Path, name: str, **model: object) -> dict:
    return {
        "name": name,
        "model": {"name": "gpt", "flavor": "debug", **model},
        "data": {**PYTEXT, "batch_size": 4, "eval_batch_size": 8},
        "trainer": {
            "max_steps": 2,
            "log_every_steps": 1,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_epoch": False},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": name},
    }


def write_job(path: Path, job: dict) -> Path:
    path.write_text(yaml.safe_dump(job))
    return path


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_rope_gpt_exports_to_onnx_and_matches_at_other_lengths(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = write_job(tmp_path / "gpt.yaml", gpt_job(tmp_path / "runs", "gpt"))
    out = tmp_path / "gpt.onnx"
    code, text, err = run_cli(capsys, "export", job, "--format", "onnx", "--out", out)
    assert code == 0, err
    assert "max abs difference to PyTorch" in text
    torch_model = build_job_model(load_job(str(job), []))[0].eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch, length in ((1, 5), (3, 23)):  # 23: longer than the traced and trained length
        tokens = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(1))
        ours = session.run(None, {"input": tokens.numpy()})[0]
        with torch.no_grad():
            theirs = torch_model(tokens).numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def lora_gpt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    storage = tmp_path_factory.mktemp("lora_gpt")
    job = gpt_job(storage, "lora_gpt", lora=GPT_LORA)
    logger = logging.getLogger("roundhouse.weights.lora")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        run = train(job)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    line = next(r for r in records if r.startswith("lora:"))
    return run, job, line


def logged_counts(line: str) -> tuple[int, int]:
    """(trainable, frozen) from the run's `lora: ... X trainable of Y parameters` line."""
    trainable, total = re.search(r"([\d,]+) trainable of ([\d,]+)", line).groups()
    trainable_n, total_n = int(trainable.replace(",", "")), int(total.replace(",", ""))
    return trainable_n, total_n - trainable_n


def reported_counts(text: str) -> tuple[int, int]:
    trainable, frozen = COUNTS.search(text).groups()
    return int(trainable.replace(",", "")), int(frozen.replace(",", ""))


def test_sample_on_a_lora_run_loads_the_adapters(
    lora_gpt_run: tuple[Path, dict, str], capsys: pytest.CaptureFixture
) -> None:
    run, _, _ = lora_gpt_run
    code, text, err = run_cli(
        capsys, "sample", run, "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"
    )
    assert code == 0, err
    assert text.startswith("def ") or "def " in text
    from roundhouse.launch.cli_sample import load_run

    merged = load_run(str(run)).model
    adapters = load_saved_model(str(run)).model  # adapters unmerged, as training ran them
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapters(tokens), atol=1e-5, rtol=0)


def test_dry_run_and_summary_count_the_lora_run_as_it_logs(
    lora_gpt_run: tuple[Path, dict, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, job, line = lora_gpt_run
    expected = logged_counts(line)
    assert expected[1] > expected[0] > 0
    job_file = write_job(tmp_path / "lora.yaml", {**job, "storage": {"path": str(tmp_path)}})
    code, text, err = run_cli(capsys, "train", job_file, "--local", "--dry-run")
    assert code == 0, err
    assert reported_counts(text + err) == expected
    lora = yaml.safe_dump(GPT_LORA, default_flow_style=True).strip()
    code, text, err = run_cli(
        capsys, "models", "summary", "gpt:debug", "--input", "16", "--num-classes", "260",
        f"model.lora={lora}",
    )  # fmt: skip
    assert code == 0, err
    assert reported_counts(text) == expected


def test_export_of_a_job_file_applies_its_hugging_face_init_from(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    reference = save_random_gpt2(tmp_path / "gpt2", vocab_size=260)
    capsys.readouterr()  # save_pretrained's progress output
    job = gpt_job(tmp_path / "runs", "hf", init_from=str(tmp_path / "gpt2"))
    job_file = write_job(tmp_path / "hf.yaml", job)
    out = tmp_path / "hf.onnx"
    code, _, err = run_cli(capsys, "export", job_file, "--format", "onnx", "--out", out)
    assert code == 0, err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    tokens = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = session.run(None, {"input": tokens.numpy()})[0]
    with torch.no_grad():
        expected = reference(tokens).logits.numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
