"""Latent diffusion end to end through the real CLI: VAE (stage 1) -> LDM (stage 2) -> sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from roundhouse.launch.cli import main
from tests.helpers.runs import final_weights, only_run, read_metrics

ROOT = Path(__file__).resolve().parents[2]


def train(config: str, storage: Path, *overrides: str) -> Path:
    args = [
        "train",
        str(ROOT / "configs" / config),
        "--local",
        "model.flavor=debug",
        "data.image_size=8",
        "data.batch_size=32",
        "trainer.max_steps=20",
        "trainer.log_every_steps=1",
        "trainer.eval_every_steps=20",
        "trainer.checkpoint.every_steps=20",
        "trainer.scheduler.warmup_steps=0",
        "trainer.optimizer.lr=0.003",
        "tracking.wandb.mode=disabled",
        "tracking.console=off",
        f"storage.path={storage}",
        *overrides,
    ]
    assert main(args) == 0
    return only_run(storage, config.removesuffix(".yaml"))


@pytest.mark.slow
def test_vae_then_ldm_trains_on_frozen_latents_and_samples(tmp_path: Path) -> None:
    vae_run = train("vae_digits.yaml", tmp_path)
    vae_rows = read_metrics(vae_run)
    vae_losses = [r["train/loss"] for r in vae_rows if "train/loss" in r]
    assert vae_losses[-1] < vae_losses[0]
    assert vae_rows[-1]["test/psnr"] > 0 and "val/kl" in vae_rows[-2] | vae_rows[-1]

    ldm_run = train("ldm_digits.yaml", tmp_path, f"model.options.vae_checkpoint={vae_run}")
    rows = read_metrics(ldm_run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert any("val/loss" in r for r in rows)

    # The frozen stage-1 weights are in the stage-2 checkpoint, unchanged.
    stage1, stage2 = final_weights(vae_run), final_weights(ldm_run)
    for key, value in stage1.items():
        assert torch.equal(stage2[f"vae.{key}"], value), key
    assert float(stage2["latent_scale"]) > 0

    out = tmp_path / "ldm.png"
    args = ["sample", str(ldm_run), "--steps", "5", "--num", "4", "--class", "3"]
    assert main([*args, "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.size == (2 * 9 + 1, 2 * 9 + 1)  # decoded back to 8x8 pixels
