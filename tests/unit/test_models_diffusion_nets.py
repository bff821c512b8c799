"""VAE, UNet, DiT and latent diffusion: shapes, cross-attention, guidance, and learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributions import Normal, kl_divergence

from roundhouse import models
from roundhouse.config import LossConfig
from roundhouse.errors import CheckpointError, ModelError
from roundhouse.models.diffusion.blocks import SpatialTransformer
from roundhouse.models.diffusion.conditioning import PAD_ID, encode_captions
from roundhouse.models.diffusion.ldm import LatentDiffusionModel
from roundhouse.runs.rundir import RunDir
from roundhouse.trainer.task import build_task
from roundhouse.weights.checkpoint import Checkpointer


def digits(num: int = 32, size: int = 8) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images[:num], dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear")
    return {"input": images.clamp(0, 1), "target": torch.as_tensor(data.target[:num])}


def build(name: str, size: int = 8, **options) -> torch.nn.Module:
    config = models.BuildConfig(flavor="debug", input_shape=(1, size, size), options=options)
    return models.build_model(name, config)


def eval_loss(task, model, batch) -> float:
    model.eval()
    with torch.no_grad():
        value = float(task.loss(task.forward(model, batch), batch))
    model.train()
    return value


def train_20_steps(name: str, model: torch.nn.Module, batch, lr: float = 3e-3) -> list[float]:
    """Eval loss (fixed draws) before and after 20 Adam steps on one batch; asserts gradients."""
    torch.manual_seed(0)
    task = build_task(models.get(name).loss, LossConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    before = eval_loss(task, model, batch)
    for step in range(20):
        loss = task.loss(task.forward(model, batch), batch)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None for p in params), "a parameter got no gradient"
        optimizer.step()
    return [before, eval_loss(task, model, batch)]


@pytest.mark.parametrize(
    ("name", "options"),
    [("vae", {}), ("ddpm", {}), ("ddpm", {"condition": "text"}), ("dit", {})],
)
def test_debug_flavor_learns_in_20_steps(name: str, options: dict) -> None:
    torch.manual_seed(0)
    model = build(name, **options)
    before, after = train_20_steps(name, model, digits(16))
    assert after < before * 0.9, (before, after)


def test_vae_kl_is_the_closed_form_gaussian_kl() -> None:
    torch.manual_seed(0)
    vae = build("vae").eval()
    x = digits(4)["input"]
    recon = vae(x)
    assert recon.shape == x.shape and vae.latent_shape == (2, 4, 4)
    mean, log_std = vae.encode(x)
    expected = kl_divergence(Normal(mean, log_std.exp()), Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(vae.kl_loss, expected, rtol=1e-5, atol=1e-5)
    assert vae.sample(3).shape == (3, 1, 8, 8)


def test_unet_cross_attention_image_queries_condition_keys_values() -> None:
    torch.manual_seed(0)
    model = build("ddpm", size=8, condition="text")
    seen = []

    def hook(module, args, kwargs, output):
        seen.append((args[0].shape, kwargs["context"].shape, output.shape))

    blocks = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    assert blocks and all(b.cross_attn is not None for b in blocks)
    for block in blocks:
        block.cross_attn.register_forward_hook(hook, with_kwargs=True)
    torch.nn.init.normal_(model.net.out[-1].weight, std=0.1)  # un-zero the output conv
    captions = encode_captions(["seven", "a much longer caption"], 16)  # (2, 16)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    eps = model.denoise(x, t, captions)
    assert eps.shape == x.shape  # the UNet keeps the input size (S3:3459)
    for query, context, out in seen:
        b, hw, c = query  # image pixels are the queries
        assert b == 2 and context == (2, 17, c)  # BOS + 16 caption bytes are keys/values
        assert out == (2, hw, c)  # one output per query
    assert {q[1] for q, _, _ in seen} == {16}  # 4x4 pixels: level 1 and the middle
    other = model.denoise(x, t, encode_captions(["two", "three"], 16))
    assert not torch.allclose(eps, other)  # the condition changes the prediction


def test_class_condition_dropout_and_null_condition() -> None:
    model = build("ddpm", p_uncond=0.5)
    encoder = model.cond_encoder
    labels = torch.tensor([3, 4, 5, 6])
    null = encoder.null_condition(labels)
    assert null.tolist() == [10] * 4  # label num_classes is the null token
    dropped = encoder.drop(labels, torch.tensor([True, False, True, False]))
    assert dropped.tolist() == [3, 10, 5, 10]
    text = build("ddpm", condition="text").cond_encoder
    caps = encode_captions(["one", "two"], 8)
    assert (text.drop(caps, torch.tensor([False, True]))[0] == PAD_ID).all()
    with pytest.raises(ModelError):
        build("ddpm", p_uncond=1.0)


def test_guidance_0_and_1_reduce_to_unconditional_and_conditional_model() -> None:
    from roundhouse.models.diffusion.samplers import SamplerConfig

    torch.manual_seed(0)
    model = build("ddpm").eval()
    labels = torch.tensor([1, 2])

    def run(guidance: float, cond: torch.Tensor) -> torch.Tensor:
        config = SamplerConfig(sampler="ddim", num_steps=3, guidance=guidance)
        return model.sample(2, config, cond, torch.Generator().manual_seed(0))

    # Randomize the zero-initialized output so the condition matters.
    torch.nn.init.normal_(model.net.out[-1].weight, std=0.1)
    torch.testing.assert_close(run(0.0, labels), run(1.0, model.null_condition(labels)))
    assert not torch.allclose(run(1.0, labels), run(0.0, labels))


def test_dit_shapes_and_zero_init() -> None:
    model = build("dit", size=8)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 500])
    eps = model.denoise(x, t, torch.tensor([0, 9]))
    assert eps.shape == x.shape and torch.count_nonzero(eps) == 0  # adaLN-Zero: starts at 0
    with pytest.raises(ModelError, match="patch size"):
        models.build_model(
            "dit", models.BuildConfig(input_shape=(1, 7, 7), options={"patch_size": 2})
        )


def write_vae_run(tmp_path: Path) -> Path:
    """A stage-1 run folder: job.yaml and a real checkpoint of a debug VAE for 8x8 digits."""
    run = tmp_path / "vae_digits" / "run1"
    run.mkdir(parents=True)
    job = {
        "name": "vae_digits",
        "model": {"name": "vae", "flavor": "debug"},
        "data": {"source": "builtin:digits"},
        "trainer": {"seed": 0},
    }
    (run / "job.yaml").write_text(yaml.safe_dump(job))
    torch.manual_seed(1)
    vae = build("vae")
    Checkpointer(RunDir(str(run)), keep_last=1, identity={}).save(
        5, {"strategy": {"model": vae.state_dict()}}
    )
    return run


def test_ldm_loads_frozen_stage1_vae_and_learns(tmp_path: Path) -> None:
    run = write_vae_run(tmp_path)
    model = build("ldm", vae_checkpoint=str(run / "checkpoints" / "step_5"))
    assert isinstance(model, LatentDiffusionModel)
    stage1 = torch.load(run / "checkpoints" / "step_5" / "state.pt", weights_only=True)
    for key, value in stage1["strategy"]["model"].items():
        torch.testing.assert_close(model.vae.state_dict()[key], value)
    assert not any(p.requires_grad for p in model.vae.parameters())
    x = digits(64)["input"]
    z = model.to_latent(x)
    assert z.shape == (64, 2, 4, 4) and math.isclose(float(z[:64].std()), 1.0, rel_tol=0.5)
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    before, after = train_20_steps("ldm", model, digits(16))
    assert after < before * 0.9, (before, after)
    for key, value in model.vae.state_dict().items():
        assert torch.equal(value, vae_before[key]), f"frozen VAE changed: {key}"
    assert not model.train().vae.training


def test_ldm_needs_a_vae_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="vae_checkpoint"):
        build("ldm")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        build("ldm", vae_checkpoint=str(tmp_path))
