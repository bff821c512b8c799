"""Every zoo family x {plain, LoRA where it applies} x every command (DESIGN: "every command works
with every task and adapter state"), on `debug` flavors under `--local`.

Per case one run of 2 steps (module-scoped, one tmp folder per case), then: `--dry-run` and
`models summary` must report the trainable/frozen counts the run logged, `export --format onnx`
must pass its own onnxruntime-against-PyTorch check (and, for classifiers, match here too),
`sample` must work where the model is generative.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from roundhouse.launch.cli import main
from roundhouse.weights.saved_model import load_saved_model

DIGITS = {"source": "builtin:digits", "batch_size": 16, "eval_batch_size": 64}
IMAGES16 = {**DIGITS, "image_size": 16}
PYTEXT = {
    "source": "builtin:pytext",
    "options": {"seq_len": 16, "max_bytes": 40_000},
    "batch_size": 4,
    "eval_batch_size": 16,
}
COUNTS = re.compile(r"trainable ([\d,]+), frozen ([\d,]+) parameters")


@dataclass(frozen=True)
class Case:
    """One family in one adapter state."""

    model: dict[str, Any]
    data: dict[str, Any]
    summary: tuple[str, ...]  # `models summary` input and classes
    sample: tuple[str, ...] | None = None  # `sample` flags, None: not generative
    overrides: dict[str, Any] = field(default_factory=dict)


LM_SUMMARY = ("--input", "16", "--num-classes", "260")
TEXT_SAMPLE = ("--prompt", "de", "--max-new-tokens", "4", "--temperature", "0")
GPT_LORA = {"rank": 2, "alpha": 4.0, "targets": ["blocks.*.attn.*_proj"]}
CASES = {
    "mlp": Case({"name": "mlp"}, DIGITS, ("--input", "1x8x8")),
    "mlp+lora": Case(
        {"name": "mlp", "lora": {"rank": 2, "alpha": 4.0, "targets": ["fc1", "head"]}},
        DIGITS,
        ("--input", "1x8x8"),
    ),
    "resnet": Case({"name": "resnet", "options": {"norm": "group"}}, DIGITS, ("--input", "1x8x8")),
    "lstm_lm": Case({"name": "lstm_lm"}, PYTEXT, LM_SUMMARY, TEXT_SAMPLE),
    "gpt": Case({"name": "gpt"}, PYTEXT, LM_SUMMARY, TEXT_SAMPLE),
    "gpt+lora": Case({"name": "gpt", "lora": GPT_LORA}, PYTEXT, LM_SUMMARY, TEXT_SAMPLE),
    "bert": Case({"name": "bert"}, PYTEXT, LM_SUMMARY),
    "moe": Case({"name": "moe"}, PYTEXT, LM_SUMMARY, TEXT_SAMPLE),
    "vae": Case({"name": "vae"}, IMAGES16, ("--input", "1x16x16"), ("--num", "4")),
    "ddpm": Case(
        {"name": "ddpm", "options": {"condition": "class"}},
        IMAGES16,
        ("--input", "1x16x16"),
        ("--num", "4", "--steps", "2"),
    ),
    "dcgan": Case({"name": "dcgan"}, IMAGES16, ("--input", "1x16x16"), ("--num", "4")),
}


def job_of(case: Case, storage: Path) -> dict:
    model = {"flavor": "debug", **case.model}
    return {
        "name": "matrix",
        "model": model,
        "data": case.data,
        "trainer": {
            "max_steps": 2,
            "log_every_steps": 1,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.001},
            "checkpoint": {"every_epoch": False},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": "run"},
    }


class Records(logging.Handler):
    """Collects the messages of the run's own log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Trained:
    case: Case
    job_file: Path
    run: Path
    counts: tuple[int, int]  # (trainable, frozen) as the run logged them
    folder: Path


def counts_in(text: str) -> tuple[int, int]:
    match = COUNTS.search(text)
    assert match, text
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


@pytest.fixture(scope="module", params=list(CASES))
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    case = CASES[request.param]
    folder = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    job_file = folder / "job.yaml"
    job_file.write_text(yaml.safe_dump(job_of(case, folder / "runs")))
    handler, root = Records(), logging.getLogger("roundhouse")
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        assert main(["train", str(job_file), "--local"]) == 0
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    logged = [m for m in handler.messages if COUNTS.search(m) and m.startswith("model ")]
    assert len(logged) == 1, handler.messages
    return Trained(case, job_file, folder / "runs" / "matrix" / "run", counts_in(logged[0]), folder)


def cli(capsys: pytest.CaptureFixture, *args: object) -> str:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_dry_run_reports_the_counts_the_run_logged(
    trained: Trained, capsys: pytest.CaptureFixture
) -> None:
    out = cli(capsys, "train", trained.job_file, "--local", "--dry-run")
    assert counts_in(out) == trained.counts


def test_summary_reports_the_counts_the_run_logged(
    trained: Trained, capsys: pytest.CaptureFixture
) -> None:
    model = trained.case.model
    overrides = [
        f"model.{key}={yaml.safe_dump(model[key], default_flow_style=True).strip()}"
        for key in ("options", "lora")
        if key in model
    ]
    ref = f"{model['name']}:debug"
    out = cli(capsys, "models", "summary", ref, *trained.case.summary, *overrides)
    assert counts_in(out) == trained.counts


def test_export_onnx_matches_pytorch(trained: Trained, capsys: pytest.CaptureFixture) -> None:
    out_file = trained.folder / "model.onnx"
    flags = ("--merge-lora",) if "lora" in trained.case.model else ()
    out = cli(capsys, "export", trained.run, "--format", "onnx", "--out", out_file, *flags)
    assert "max abs difference to PyTorch" in out  # the command's own onnxruntime check
    if trained.case.data is DIGITS:  # a classifier: check again here, on digits-shaped inputs
        saved = load_saved_model(str(trained.run), merge=True)
        x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        session = ort.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = saved.model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, atol=1e-4)
    if trained.case.model["name"] == "dcgan":  # the GAN task exports its generator: z -> image
        generator = load_saved_model(str(trained.run)).model.generator.eval()
        z = torch.randn(3, generator.latent_dim, generator=torch.Generator().manual_seed(0))
        session = ort.InferenceSession(str(out_file), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            expected = generator(z).numpy()
        images = session.run(None, {"z": z.numpy()})[0]
        assert images.shape == (3, 1, 16, 16) and "the generator of dcgan" in out
        np.testing.assert_allclose(images, expected, atol=1e-4)


def test_sample_where_generative(trained: Trained, capsys: pytest.CaptureFixture) -> None:
    if trained.case.sample is None:
        code = main(["sample", str(trained.run)])
        assert code == 2 and "cannot sample" in capsys.readouterr().err
        return
    out_file = trained.folder / "sample.out"
    out = cli(capsys, "sample", trained.run, *trained.case.sample, "--out", out_file)
    assert out.strip() and out_file.stat().st_size > 0
