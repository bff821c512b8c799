"""Optimizers, schedules and losses, with the defaults the notes give (SEEDS F23, F24, B2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from roundhouse.config import LossConfig, OptimizerConfig, SchedulerConfig
from roundhouse.errors import JobFileError
from roundhouse.trainer.losses import build_loss, focal_loss, mixed_loss, topk_correct
from roundhouse.trainer.optim import OPTIMIZERS, build_optimizer, build_scheduler, lr_factor_fn


def params() -> list[nn.Parameter]:
    return list(nn.Linear(3, 2).parameters())


def test_adam_defaults_from_the_notes() -> None:
    """SEEDS F23 (S2:245-247): Adam lr 1e-3, beta1 0.9, beta2 0.999."""
    opt = build_optimizer(params(), OptimizerConfig())
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam)
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999)


def test_sgd_momentum_and_nesterov() -> None:
    """SEEDS F23 (S2:238): momentum 0.9."""
    opt = build_optimizer(params(), OptimizerConfig(name="sgd", nesterov=True, weight_decay=1e-4))
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] and group["weight_decay"] == 1e-4


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_takes_a_step(name: str) -> None:
    layer = nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    opt = build_optimizer(layer.parameters(), OptimizerConfig(name=name, lr=0.1))
    layer(torch.ones(4, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, layer.weight)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_is_fused_on_cpu_and_takes_the_same_steps_as_the_per_tensor_loop(name: str) -> None:
    """The fused kernel (one pass per tensor) gives the reference loop's weights."""
    torch.manual_seed(0)
    fused_layer, loop_layer = nn.Linear(5, 3), nn.Linear(5, 3)
    loop_layer.load_state_dict(fused_layer.state_dict())
    config = OptimizerConfig(name=name, lr=0.05, weight_decay=0.1)
    groups = [{"params": iter([fused_layer.weight])}, {"params": [fused_layer.bias], "lr": 0.1}]
    fused = build_optimizer(iter(groups), config)  # generators are taken as well
    reference = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    loop = reference(
        [{"params": [loop_layer.weight]}, {"params": [loop_layer.bias], "lr": 0.1}],
        lr=0.05,
        weight_decay=0.1,
        foreach=False,
    )
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    x = torch.randn(8, 5)
    for _ in range(3):
        for layer, opt in ((fused_layer, fused), (loop_layer, loop)):
            opt.zero_grad()
            layer(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(fused_layer.weight, loop_layer.weight)
    torch.testing.assert_close(fused_layer.bias, loop_layer.bias)


def test_params_on_the_meta_device_keep_torchs_default_implementation() -> None:
    layer = nn.Linear(3, 2, device="meta")
    opt = build_optimizer(layer.parameters(), OptimizerConfig(name="adamw"))
    assert opt.param_groups[0]["fused"] is None


def test_unknown_optimizer_lists_valid_ones() -> None:
    with pytest.raises(JobFileError, match="adamw"):
        build_optimizer(params(), OptimizerConfig(name="lion"))


def test_step_schedule_halves_every_ten_epochs() -> None:
    """SEEDS F24 (S2:209): halve the learning rate every 10 epochs."""
    f = lr_factor_fn(SchedulerConfig(name="step"), steps_per_epoch=5, total_steps=500, base_lr=1.0)
    assert f(0) == 1.0 and f(49) == 1.0
    assert f(50) == 0.5 and f(100) == 0.25


def test_exponential_schedule_decays_gamma_per_epoch() -> None:
    f = lr_factor_fn(
        SchedulerConfig(name="exponential", gamma=0.9),
        steps_per_epoch=4,
        total_steps=40,
        base_lr=1.0,
    )
    assert f(4) == pytest.approx(0.9) and f(8) == pytest.approx(0.81)


def test_warmup_then_cosine_to_min_lr() -> None:
    config = SchedulerConfig(name="cosine", warmup_steps=10, min_lr=1e-4)
    f = lr_factor_fn(config, steps_per_epoch=10, total_steps=110, base_lr=1e-2)
    assert f(0) == pytest.approx(1 / 11) and f(9) == pytest.approx(10 / 11)
    assert f(10) == pytest.approx(1.0)
    assert f(110) * 1e-2 == pytest.approx(1e-4)


def test_scheduler_drives_the_optimizer_lr() -> None:
    opt = build_optimizer(params(), OptimizerConfig(name="sgd", lr=1.0))
    sched = build_scheduler(
        opt, SchedulerConfig(name="step", step_epochs=1), steps_per_epoch=2, total_steps=10
    )
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_unknown_scheduler_lists_valid_ones() -> None:
    with pytest.raises(JobFileError, match="cosine"):
        lr_factor_fn(SchedulerConfig(name="onecycle"), steps_per_epoch=1, total_steps=1, base_lr=1)


def test_focal_loss_with_gamma_zero_is_cross_entropy() -> None:
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert focal_loss(logits, target, gamma=0.0, alpha=None) == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6
    )


def test_focal_loss_down_weights_easy_examples() -> None:
    """SEEDS B2 (S2:271-282): as p_t -> 1 the factor (1 - p_t)^gamma -> 0."""
    easy = torch.tensor([[10.0, 0.0]])
    hard = torch.tensor([[0.0, 0.0]])
    target = torch.tensor([0])
    ratio_easy = focal_loss(easy, target, 2.0, None) / F.cross_entropy(easy, target)
    ratio_hard = focal_loss(hard, target, 2.0, None) / F.cross_entropy(hard, target)
    assert ratio_easy < 1e-6 and ratio_hard == pytest.approx(0.25)


def test_label_smoothing_raises_the_loss_of_a_confident_correct_prediction() -> None:
    logits, target = torch.tensor([[20.0, 0.0, 0.0]]), torch.tensor([0])
    plain = build_loss(LossConfig())(logits, target)
    smooth = build_loss(LossConfig(label_smoothing=0.1))(logits, target)
    assert smooth > plain + 0.5


def test_regression_losses_use_one_hot_targets() -> None:
    logits, target = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert build_loss(LossConfig(name="mse"))(logits, target) == 0.0
    assert build_loss(LossConfig(name="l1"))(logits, torch.tensor([1])) == 1.0


def test_mixup_loss_is_the_lam_weighted_mix() -> None:
    loss_fn = build_loss(LossConfig())
    out = torch.randn(4, 3)
    ya, yb = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2])
    batch = {"target": ya, "target_b": yb, "mix_lam": torch.tensor(0.3)}
    expected = 0.3 * loss_fn(out, ya) + 0.7 * loss_fn(out, yb)
    assert mixed_loss(loss_fn, out, batch) == pytest.approx(expected.item())


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    target = torch.tensor([2, 0])
    assert topk_correct(logits, target, 1) == 1
    assert topk_correct(logits, target, 2) == 2
    assert topk_correct(logits, target, 5) == 2  # k capped at the number of classes
    assert math.isfinite(float(focal_loss(logits, target)))
