"""DCGAN and the `gan` task: shapes, two optimizers in D-then-G order, `sample` writing a PNG
grid, and the classifier-feature FID (ours from summed statistics = torchmetrics')."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from roundhouse.config.loading import validate_job
from roundhouse.errors import ModelError
from roundhouse.launch.cli import main
from roundhouse.models import BuildConfig, get
from roundhouse.models.gan import MinibatchStd
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.fid import (
    ClassifierFeatures,
    feature_sums,
    frechet_distance,
    gaussian_of,
    torchmetrics_fid,
)
from roundhouse.trainer.task_api import TaskError
from roundhouse.trainer.tasks_gan import GANTask
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.runs import read_metrics


def gan_job(tmp_path: Path, run_id: str = "gan", **trainer: object) -> dict:
    return {
        "name": "gan",
        "model": {"name": "dcgan", "flavor": "debug", "options": {"spectral_norm": True}},
        "task": {"name": "gan", "optimizers": {"generator": {"optimizer": {"lr": 0.002}}}},
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": 3,
            "log_every_steps": 1,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.001, "betas": [0.5, 0.999]},
            "checkpoint": {"every_epoch": False},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(tmp_path / "runs"), "run_id": run_id},
    }


def train(job: dict) -> Path:
    prepared = prepare_run(validate_job(job))
    run_worker(prepared.job, build_local_context("cpu"))
    return Path(prepared.run_dir.url)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_generator_and_discriminator_shapes(size: int) -> None:
    model = get("dcgan").build(BuildConfig(input_shape=(1, size, size), options={}))
    images = model.sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, size, size)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert model(images).shape == (5,)


def test_spectral_norm_bounds_the_discriminators_weights() -> None:
    model = get("dcgan").build(BuildConfig(input_shape=(1, 8, 8), options={"spectral_norm": True}))
    model.train()
    for _ in range(30):  # power iterations converge
        model(torch.rand(4, 1, 8, 8))
    weight = model.discriminator.head.weight
    assert float(torch.linalg.matrix_norm(weight.detach(), ord=2)) == pytest.approx(1.0, rel=0.05)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.discriminator.modules())


def test_minibatch_std_shows_the_discriminator_a_batch_without_diversity() -> None:
    options = {"spectral_norm": True, "minibatch_std": True}
    model = get("dcgan").build(BuildConfig(input_shape=(1, 8, 8), options=options)).eval()
    std = model.discriminator.features[-1]
    assert isinstance(std, MinibatchStd)
    same = torch.rand(1, 1, 8, 8).expand(6, 1, 8, 8)
    varied = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert float(std(same)[:, -1].max()) < 1e-3  # a collapsed batch: no spread at all
    assert float(std(varied)[:, -1].min()) > 0.2  # uniform pixels: std ~0.29
    assert model(varied).shape == (6,) and model(varied[:1]).shape == (1,)


def test_one_sided_label_smoothing_of_the_real_images() -> None:
    model = get("dcgan").build(BuildConfig(input_shape=(1, 8, 8), options={"channels": 4}))
    batch = {"input": torch.rand(4, 1, 8, 8), "target": torch.zeros(4, dtype=torch.long)}
    losses = {}
    for label in (1.0, 0.9):
        torch.manual_seed(0)  # the same generated images
        task = GANTask(real_label=label)
        losses[label] = task.step_loss(model.eval(), batch, "discriminator").detach()
    torch.manual_seed(0)
    with torch.no_grad():
        fake = model.generator(torch.randn(4, model.latent_dim))
        d_real, d_fake = model.discriminator(batch["input"]), model.discriminator(fake)
        expected = (0.9 * F.softplus(-d_real) + 0.1 * F.softplus(d_real)).mean()
        expected = expected + F.softplus(d_fake).mean()
    assert float(losses[0.9]) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses[0.9]) != pytest.approx(float(losses[1.0]), rel=1e-3)
    with pytest.raises(TaskError, match="real_label"):
        GANTask(real_label=0.3)


def test_the_averaged_generator_follows_training_and_is_what_samples_draw_from(
    tmp_path: Path,
) -> None:
    options = {"channels": 4, "ema_decay": 0.5}
    model = get("dcgan").build(BuildConfig(input_shape=(1, 8, 8), options=options)).train()
    params = dict(model.named_parameters())
    assert not any(name.startswith("generator_ema") for name in params)  # buffers: no optimizer
    before = model.generator_ema.to_image.weight.clone()
    with torch.no_grad():
        model.generator.to_image.weight.add_(1.0)
    batch = {"input": torch.rand(4, 1, 8, 8), "target": torch.zeros(4, dtype=torch.long)}
    GANTask().step_loss(model, batch, "generator")  # the generator's turn moves the average
    torch.testing.assert_close(model.generator_ema.to_image.weight, before + 0.5)
    GANTask().step_loss(model, batch, "discriminator")  # D's turn does not
    torch.testing.assert_close(model.generator_ema.to_image.weight, before + 0.5)
    z = torch.randn(3, model.latent_dim, generator=torch.Generator().manual_seed(0))
    drawn = GANTask().sample(model, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(drawn, model.generator_ema(z))
    assert GANTask().export_module(model) is model.generator_ema
    job = gan_job(tmp_path, "ema")  # trains, checkpoints and samples through the CLI
    job["model"]["options"]["ema_decay"] = 0.9
    run = train(job)
    assert main(["sample", str(run), "--num", "4", "--out", str(tmp_path / "g.png")]) == 0


def test_a_size_that_is_not_a_power_of_two_is_refused() -> None:
    with pytest.raises(ModelError, match="power of two"):
        get("dcgan").build(BuildConfig(input_shape=(1, 12, 12), options={}))


def test_gan_trains_discriminator_then_generator_and_samples_a_png(tmp_path: Path) -> None:
    run = train(gan_job(tmp_path))
    rows = [r for r in read_metrics(run) if "train/loss_discriminator" in r]
    assert len(rows) == 3
    assert rows[-1]["train/lr_generator"] == 0.002 and rows[-1]["train/lr_discriminator"] == 0.001
    final = read_metrics(run)[-1]
    assert {"test/d_loss", "test/g_loss", "test/d_real_acc"} <= set(final)
    out = tmp_path / "grid.png"
    assert main(["sample", str(run), "--num", "9", "--out", str(out)]) == 0
    grid = Image.open(out)
    assert grid.size == (3 * 9 + 1, 3 * 9 + 1)  # 3x3 images of 8x8 with 1-pixel padding
    assert main(["sample", str(run), "--guidance", "2"]) == 2  # a diffusion flag


def test_sample_on_a_task_that_cannot_sample_is_exit_2(tmp_path: Path) -> None:
    job = gan_job(tmp_path, "mlp", max_steps=1)
    job["model"] = {"name": "mlp"}
    del job["task"]
    run = train(job)
    assert main(["sample", str(run)]) == 2


def classifier_run(tmp_path: Path) -> Path:
    job = gan_job(tmp_path, "clf", max_steps=20)
    job["model"] = {"name": "mlp"}
    job["trainer"]["optimizer"] = {"name": "adam", "lr": 0.01}
    del job["task"]
    return train(job)


def test_fid_from_summed_statistics_equals_torchmetrics(tmp_path: Path) -> None:
    from roundhouse.trainer.fid import load_classifier_features

    features = load_classifier_features(str(classifier_run(tmp_path)))
    assert isinstance(features, ClassifierFeatures)
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.rand(300, 1, 8, 8, generator=gen), torch.rand(200, 1, 8, 8, generator=gen)
    fake = fake * 0.5  # a different distribution
    sums: dict[str, float] = {}
    for part in (real[:150], real[150:]):  # batches (or ranks) add up
        for k, v in feature_sums(features(part), "r_").items():
            sums[k] = sums.get(k, 0.0) + float(v)
    for k, v in feature_sums(features(fake), "f_").items():
        sums[k] = float(v)
    dim = features.num_features
    ours = frechet_distance(*gaussian_of(sums, "r_", dim), *gaussian_of(sums, "f_", dim))
    theirs = torchmetrics_fid(features, real, fake)
    assert ours == pytest.approx(theirs, rel=1e-4)
    assert theirs > 1.0
    assert torchmetrics_fid(features, real, real) == pytest.approx(0.0, abs=1e-3)


def test_fid_is_a_validation_metric_and_the_tasks_metric(tmp_path: Path) -> None:
    clf = classifier_run(tmp_path)
    job = gan_job(tmp_path, max_steps=4, eval_every_steps=2)
    job["task"]["options"] = {"fid_classifier": str(clf)}
    job["trainer"]["early_stopping"] = {"patience": 5}  # selects on val/fid, min
    run = train(job)
    evals = [r for r in read_metrics(run) if "val/fid" in r]
    assert len(evals) == 2 and all(r["val/fid"] > 0 for r in evals)
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--num", "64", "--out", str(out), "--score", str(clf)]) == 0


@pytest.mark.parametrize("model", ["vae", "ddpm"])
def test_fid_is_an_optional_validation_metric_of_vae_and_diffusion(
    tmp_path: Path, model: str
) -> None:
    clf = classifier_run(tmp_path)
    job = gan_job(tmp_path, model, max_steps=2)
    job["model"] = {"name": model, "flavor": "debug"}
    job["task"] = {
        "options": {"fid_classifier": str(clf), **({"fid_steps": 2} if model == "ddpm" else {})}
    }
    job["trainer"]["early_stopping"] = {"patience": 5}
    run = train(job)
    final = read_metrics(run)[-1]
    assert final["val/fid"] > 0 and final["test/fid"] > 0
