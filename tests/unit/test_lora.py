"""`model.lora`: peft adapters on zoo models, small checkpoints, resume, merge, bad targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse import models
from roundhouse.config.loading import validate_job
from roundhouse.errors import CheckpointError, JobFileError
from roundhouse.launch.cli import main
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.preflight import preflight
from roundhouse.weights.lora import apply_lora, match_targets, merge_lora
from roundhouse.weights.run_folder import prepare_run
from roundhouse.weights.saved_model import load_saved_model
from tests.helpers.runs import final_weights

LORA = {"rank": 4, "alpha": 8.0, "targets": ["fc1", "head"]}


def lora_job(storage: Path, run_id: str, **sections: Any) -> dict:
    job = {
        "name": "lora",
        "model": {"name": "mlp", "flavor": "debug", "lora": LORA},
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": 6,
            "log_every_steps": 2,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_steps": 3, "every_epoch": False, "keep_last": 5},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": run_id},
    }
    for key, value in sections.items():
        job[key] = {**job[key], **value}
    return job


def train(job: dict, resume: bool = False) -> Path:
    prepared = prepare_run(validate_job(job), "latest" if resume else None)
    run_worker(prepared.job, build_local_context("cpu"), resume=resume)
    return Path(prepared.run_dir.url)


def build(name: str, flavor: str = "debug") -> torch.nn.Module:
    config = models.BuildConfig(flavor=flavor, input_shape=(1, 8, 8), num_classes=10)
    return models.build_model(name, config)


def test_only_adapters_train_and_the_checkpoint_holds_only_them(tmp_path: Path) -> None:
    run = train(lora_job(tmp_path, "a"))
    weights = final_weights(run)
    assert weights, "the checkpoint has the adapters"
    assert all(".lora_" in k for k in weights), sorted(weights)  # no frozen base weight
    state = torch.load(run / "checkpoints/step_6/state.pt", weights_only=True)
    assert len(state["lora"]["base_sha256"]) == 64
    assert state["lora"]["base_source"]["model"] == "mlp"
    assert state["lora"]["targets"] == ["fc1", "head"]
    moved = [k for k, v in weights.items() if "lora_B" in k and float(v.abs().max()) > 1e-4]
    assert moved, "lora_B starts at zero; training must move it"


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = final_weights(train(lora_job(tmp_path / "a", "a")))
    half = lora_job(tmp_path / "b", "b", trainer={"max_steps": 3})
    train(half)
    resumed = final_weights(train(lora_job(tmp_path / "b", "b"), resume=True))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(whole[key], resumed[key], rtol=0, atol=0)


def test_resume_onto_another_base_is_refused(tmp_path: Path) -> None:
    train(lora_job(tmp_path, "a", trainer={"max_steps": 3}))
    other_seed = lora_job(tmp_path, "a", trainer={"seed": 7})
    with pytest.raises(CheckpointError, match="sha256"):
        train(other_seed, resume=True)


def test_conv_layers_get_adapters_and_merging_keeps_the_outputs() -> None:
    torch.manual_seed(0)
    model = build("resnet")
    job = validate_job(
        {"name": "x", "model": {"name": "resnet", "lora": {"rank": 2, "targets": ["layer*.conv*"]}}}
    )
    state = apply_lora(model, job)
    assert state is not None and state.targets == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer2.0.conv1",
        "layer2.0.conv2",
    ]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained-looking adapter
    x = torch.rand(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        after = model(x)
    assert set(model.state_dict()) == set(build("resnet").state_dict())
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)


def test_globs_match_module_names_exactly() -> None:
    model = build("resnet")
    assert match_targets(model, ["conv1"]) == ["conv1"]  # not layer1.0.conv1
    assert match_targets(model, ["*conv1"]) == ["conv1", "layer1.0.conv1", "layer2.0.conv1"]
    assert match_targets(model, ["layer1.*.bn1"]) == []  # BatchNorm cannot take LoRA


def test_targets_matching_nothing_are_one_line_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job_file = tmp_path / "job.yaml"
    job_file.write_text("name: x\nmodel: {name: mlp}\n")
    storage = tmp_path / "runs"
    code = main(
        [
            "train",
            str(job_file),
            "--local",
            "model.lora={targets: [nothing.*]}",
            f"storage.path={storage}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: model.lora.targets ['nothing.*'] match no Linear or Conv")
    assert "fc1" in err and len(err.splitlines()) == 1
    assert not storage.exists()


def test_zero3_is_refused() -> None:
    job = validate_job(
        {
            "name": "x",
            "model": {"name": "mlp", "lora": {"targets": ["fc1"]}},
            "strategy": {"kind": "deepspeed", "zero_stage": 3},
            "cluster": {"num_workers": 2},
        }
    )
    with pytest.raises(JobFileError, match="ZeRO stages 0-2"):
        preflight(job)  # the DeepSpeed strategy's own job check


def test_a_lora_run_loads_back_merged_or_not(tmp_path: Path) -> None:
    run = train(lora_job(tmp_path, "a"))
    plain = load_saved_model(str(run), merge=True)
    adapted = load_saved_model(str(run))
    assert adapted.lora is not None and plain.lora is None
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain.model(x), adapted.model(x), rtol=1e-4, atol=1e-5)
