"""`model.options.norm` across the CNN zoo and `data.normalize` (explicit, imagenet, and the
default for a torchvision `init_from`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from roundhouse import models
from roundhouse.config.loading import validate_job
from roundhouse.errors import DataError, JobFileError, ModelError
from roundhouse.models.norms import NORMS
from roundhouse.weights.model_build import build_model_for

CNNS = {
    "lenet": (1, 8, 8),
    "alexnet": (1, 32, 32),
    "vgg": (1, 32, 32),
    "nin": (1, 32, 32),
    "googlenet": (1, 32, 32),
    "resnet": (1, 8, 8),
    "densenet": (1, 8, 8),
}
NORM_TYPES = {
    "batch": nn.BatchNorm2d,
    "sync_batch": nn.BatchNorm2d,
    "group": nn.GroupNorm,
    "instance": nn.InstanceNorm2d,
    "layer": nn.GroupNorm,
}


def build(name: str, **options: object) -> nn.Module:
    config = models.BuildConfig(
        flavor="debug", input_shape=CNNS[name], num_classes=10, options=options
    )
    torch.manual_seed(0)
    return models.build_model(name, config)


@pytest.mark.parametrize("name", list(CNNS))
def test_every_cnn_takes_every_norm(name: str) -> None:
    x = torch.randn(3, *CNNS[name], generator=torch.Generator().manual_seed(1))
    for norm in NORMS:
        model = build(name, norm=norm).train()
        kinds = {type(m) for m in model.modules() if "Norm" in type(m).__name__}
        assert kinds == {NORM_TYPES[norm]}, (norm, kinds)
        if norm == "layer":
            assert all(m.num_groups == 1 for m in model.modules() if isinstance(m, nn.GroupNorm))
        out = model(x)
        assert out.shape == (3, 10)
        if norm in ("group", "instance", "layer"):  # per sample: independent of the batch
            model.eval()  # (dropout off; these norms use the sample's statistics in eval too)
            torch.testing.assert_close(model(x[:1]), model(x)[:1], atol=1e-5, rtol=0)


def test_bad_norm_names_are_one_line_errors() -> None:
    with pytest.raises(ModelError, match=r"unknown options.norm 'weight'.*batch, sync_batch"):
        build("resnet", norm="weight")
    config = models.BuildConfig(
        flavor="debug", input_shape=(1, 8, 8), num_classes=10, options={"norm": "group"}
    )
    with pytest.raises(ModelError, match="has no option 'norm'"):
        models.build_model("mlp", config)


def job_with(**data: object) -> object:
    return validate_job(
        {"name": "n", "model": {"name": "resnet", "flavor": "debug"}, "data": {**data}}
    )


def test_data_normalize_runs_before_the_model_on_every_input() -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = build_model_for(job_with(), (3, 8, 8), 10).eval()
    torch.manual_seed(0)
    job = job_with(normalize={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5]})
    normalized = build_model_for(job, (3, 8, 8), 10).eval()
    assert normalized.state_dict().keys() == plain.state_dict().keys()
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(normalized(x), plain((x - mean) / std))
    torch.manual_seed(0)
    imagenet = build_model_for(job_with(normalize="imagenet"), (3, 8, 8), 10).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(imagenet(x), plain((x - mean) / std))
    with pytest.raises(DataError, match="3 channel values, the inputs have 1 channels"):
        build_model_for(job_with(normalize="imagenet"), (1, 8, 8), 10)
    with pytest.raises(JobFileError, match=r"data\.normalize"):
        job_with(normalize={"mean": [0.5], "std": [0.2, 0.3]})


def test_a_torchvision_init_from_defaults_to_imagenet_and_logs_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    weights = tmp_path / "resnet.pth"
    torch.save(build("resnet").state_dict(), weights)
    job = validate_job(
        {"name": "n", "model": {"name": "resnet", "init_from": str(weights)}, "data": {}}
    )
    with caplog.at_level("INFO", logger="roundhouse.weights.model_build"):
        model = build_model_for(job, (3, 8, 8), 10)
    assert "imagenet (the default for a torchvision model.init_from)" in caplog.text
    assert len(model._forward_pre_hooks) == 1
    off = job.model_copy(update={"data": job.data.model_copy(update={"normalize": "none"})})
    assert len(build_model_for(off, (3, 8, 8), 10)._forward_pre_hooks) == 0


def test_sync_batch_is_refused_under_deepspeed_pipeline_stages() -> None:
    """A pipeline stage's BatchNorm all-reduce would wait for ranks of other stages (a hang)."""
    from roundhouse.trainer.preflight import preflight

    job = validate_job(
        {
            "name": "syncbn-pipe",
            "model": {"name": "vgg", "flavor": "debug", "options": {"norm": "sync_batch"}},
            "data": {"source": "builtin:digits", "batch_size": 8},
            "trainer": {"max_steps": 1},
            "strategy": {"kind": "deepspeed", "zero_stage": 0, "pipeline_stages": 2},
            "cluster": {"num_workers": 2},
            "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        }
    )
    with pytest.raises(JobFileError, match="sync_batch needs data parallelism only"):
        preflight(job, 2)
