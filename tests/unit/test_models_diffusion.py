"""Schedules, samplers and guidance against diffusers' DDPMScheduler/DDIMScheduler."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from roundhouse.errors import ModelError
from roundhouse.models.diffusion.samplers import (
    SamplerConfig,
    ddim_step,
    ddpm_step,
    guided_eps,
    inference_timesteps,
    sample_latents,
)
from roundhouse.models.diffusion.schedules import build_schedule

SCHEDULES = [("linear", "linear"), ("cosine", "squaredcos_cap_v2")]


@pytest.mark.parametrize(("ours", "theirs"), SCHEDULES)
def test_schedule_equals_diffusers(ours: str, theirs: str) -> None:
    schedule = build_schedule(ours, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    torch.testing.assert_close(schedule.betas, ref.betas, rtol=0, atol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    assert (schedule.betas[1:] >= schedule.betas[:-1]).all()  # increasing with t (S3:3531)


def test_q_sample_equals_diffusers_add_noise() -> None:
    schedule = build_schedule("cosine", 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(
        schedule.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(("ours", "theirs"), SCHEDULES)
@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddpm_step_equals_diffusers_with_the_same_noise(
    ours: str, theirs: str, num_steps: int
) -> None:
    schedule = build_schedule(ours, 1000)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    assert ref.config.variance_type == "fixed_small" and ref.config.clip_sample
    ref.set_timesteps(num_steps)
    ours_t = inference_timesteps(1000, num_steps)
    assert ours_t == ref.timesteps.tolist()
    stride = 1000 // num_steps
    gen = torch.Generator().manual_seed(1)
    for t in [ours_t[0], ours_t[len(ours_t) // 2], ours_t[-2], 0]:
        x, eps = torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 1, 8, 8, generator=gen)
        # diffusers draws the step's noise from a generator: give ours the same draw.
        noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(t))
        mine, _ = ddpm_step(schedule, eps, t, t - stride, x, noise)
        expected = ref.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


def test_ddpm_step_adds_fresh_noise_except_at_t0() -> None:
    schedule = build_schedule("linear", 1000)
    x, eps = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    a, _ = ddpm_step(schedule, eps, 500, 499, x, torch.randn(1, 1, 4, 4))
    b, _ = ddpm_step(schedule, eps, 500, 499, x, torch.randn(1, 1, 4, 4))
    assert not torch.allclose(a, b)
    c, _ = ddpm_step(schedule, eps, 0, -1, x, torch.randn(1, 1, 4, 4))
    d, _ = ddpm_step(schedule, eps, 0, -1, x, torch.randn(1, 1, 4, 4))
    torch.testing.assert_close(c, d)


@pytest.mark.parametrize(("ours", "theirs"), SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_diffusers(ours: str, theirs: str, eta: float) -> None:
    schedule = build_schedule(ours, 1000)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    ref.set_timesteps(50)
    ours_t = inference_timesteps(1000, 50)
    assert ours_t == ref.timesteps.tolist()
    gen = torch.Generator().manual_seed(2)
    for t in [ours_t[0], ours_t[17], 0]:
        x, eps = torch.randn(2, 2, 4, 4, generator=gen), torch.randn(2, 2, 4, 4, generator=gen)
        noise = torch.randn(2, 2, 4, 4, generator=gen)
        mine, _ = ddim_step(schedule, eps, t, t - 20, x, noise, eta=eta)
        expected = ref.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


def test_inference_timesteps_bounds() -> None:
    assert inference_timesteps(1000, 4) == [750, 500, 250, 0]
    with pytest.raises(ModelError):
        inference_timesteps(1000, 0)
    with pytest.raises(ModelError):
        inference_timesteps(10, 11)


def _toy_denoise(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """A condition-dependent 'model': eps = 0.1 x + 0.1 cond (null condition = -1 -> 0)."""
    shift = torch.zeros(x.shape[0]) if cond is None else 0.1 * cond.float().clamp(min=0)
    return 0.1 * x + shift.view(-1, 1, 1, 1)


def test_guidance_weight_0_is_unconditional_and_1_is_conditional() -> None:
    x, t = torch.randn(3, 1, 4, 4), torch.full((3,), 10)
    cond, null = torch.tensor([1, 2, 3]), torch.full((3,), -1)
    uncond = _toy_denoise(x, t, null)
    conditional = _toy_denoise(x, t, cond)
    torch.testing.assert_close(guided_eps(_toy_denoise, x, t, cond, null, 0.0), uncond)
    torch.testing.assert_close(guided_eps(_toy_denoise, x, t, cond, null, 1.0), conditional)
    w3 = guided_eps(_toy_denoise, x, t, cond, null, 3.0)
    torch.testing.assert_close(w3, uncond + 3.0 * (conditional - uncond))


class _ToyModel:
    """The sampler protocol around `_toy_denoise`."""

    def __init__(self) -> None:
        self.schedule = build_schedule("linear", 100)
        self.clip_sample = 1.0

    def denoise(self, x, t, cond):
        return _toy_denoise(x, t, cond)

    def null_condition(self, cond):
        return torch.full_like(cond, -1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_seeded_and_guidance_changes_it(sampler: str) -> None:
    model, cond = _ToyModel(), torch.tensor([1, 1])

    def run(guidance: float, seed: int) -> torch.Tensor:
        config = SamplerConfig(sampler=sampler, num_steps=10, guidance=guidance)
        gen = torch.Generator().manual_seed(seed)
        return sample_latents(model, (1, 4, 4), 2, cond, config, gen)

    torch.testing.assert_close(run(3.0, 0), run(3.0, 0))
    assert not torch.allclose(run(3.0, 0), run(0.0, 0))
    assert not torch.allclose(run(3.0, 0), run(3.0, 1))


def test_sampler_config_rejects_bad_values() -> None:
    with pytest.raises(ModelError):
        SamplerConfig(sampler="euler")
    with pytest.raises(ModelError):
        SamplerConfig(guidance=-1.0)
