"""MoE routing, capacity and aux losses; BERT's masking rules and the LM tasks' metrics."""

from __future__ import annotations

import math

import pytest
import torch

from roundhouse import models
from roundhouse.config import LossConfig
from roundhouse.data.text import MASK_ID, PAD_ID
from roundhouse.models.moe import MoELayer, assign, capacity
from roundhouse.trainer.task import build_task
from roundhouse.trainer.tasks_lm import Masking

VOCAB = 260


def moe_model(**options):
    config = models.BuildConfig(input_shape=(16,), num_classes=VOCAB, options=options)
    return models.get("moe").build(config)


def test_capacity_drops_assignments_beyond_it_in_priority_order() -> None:
    # Four tokens all prefer expert 0; capacity 2 keeps the first two.
    probs = torch.tensor([[0.7, 0.2, 0.1]] * 4)
    experts, weights, kept = assign(probs, top_k=1, slots=2)
    assert experts.squeeze(1).tolist() == [0, 0, 0, 0]
    assert kept.squeeze(1).tolist() == [True, True, False, False]
    assert weights.squeeze(1).tolist() == pytest.approx([0.7, 0.7, 0.0, 0.0])
    assert capacity(num_tokens=4, num_experts=3, top_k=1, factor=1.5) == 2


def test_dropped_tokens_pass_through_as_zero_and_are_counted() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 16, num_experts=4, top_k=1, capacity_factor=0.25)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[0].fill_(1.0)  # every token prefers expert 0
    x = torch.rand(1, 16, 8) + 0.1
    out = layer(x)
    kept = capacity(16, 4, 1, 0.25)  # 1 slot
    assert layer.dropped_tokens.item() == 16 - kept
    assert (out.view(16, 8).abs().sum(-1) > 0).sum().item() == kept
    assert layer.expert_counts.tolist() == [16.0, 0.0, 0.0, 0.0]


def test_top2_routes_each_token_to_two_experts_with_weights_summing_to_one() -> None:
    probs = torch.softmax(torch.randn(10, 4), dim=-1)
    experts, weights, kept = assign(probs, top_k=2, slots=100)
    assert kept.all() and (experts[:, 0] != experts[:, 1]).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))
    layer = MoELayer(8, 16, num_experts=4, top_k=2, capacity_factor=4.0)
    layer(torch.randn(2, 5, 8))
    assert layer.expert_counts.sum().item() == 20  # 10 tokens x 2 experts


def test_aux_losses_are_added_to_the_training_loss() -> None:
    torch.manual_seed(0)
    task = build_task("language_model", LossConfig())
    tokens = torch.randint(0, 256, (2, 17))
    batch = {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    with_aux = task.loss(task.forward(moe_model(), batch), batch)
    torch.manual_seed(0)
    logits = task.forward(moe_model(balance_coef=0.0, z_coef=0.0), batch)
    without = task.loss(logits, batch)
    assert task.aux.loss.item() == 0.0
    assert with_aux.item() > without.item()
    # The balance loss is >= 1 per MoE layer (1 when perfectly even), so aux >= 0.01 * layers.
    task.forward(moe_model(), batch)
    assert task.aux.loss.item() >= 0.01 * 2
    sums = task.eval_sums(logits, batch)
    assert "expert0_tokens" in sums


def test_moe_metrics_report_expert_fractions() -> None:
    torch.manual_seed(0)
    task = build_task("language_model", LossConfig())
    tokens = torch.randint(0, 256, (4, 17))
    batch = {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    sums = task.eval_sums(task.forward(moe_model(), batch), batch)
    metrics = task.finalize({k: float(v) for k, v in sums.items()})
    fractions = [metrics[f"expert{i}_frac"] for i in range(4)]
    assert sum(fractions) == pytest.approx(1.0)
    assert 0 <= metrics["dropped_frac"] < 1 and metrics["aux_loss"] > 0


def test_language_model_metrics_are_consistent() -> None:
    task = build_task("language_model", LossConfig())
    logits = torch.zeros(2, 4, VOCAB)  # uniform: loss = ln V
    batch = {
        "input": torch.zeros(2, 4, dtype=torch.long),
        "target": torch.ones(2, 4, dtype=torch.long),
    }
    batch["target"][1, 3] = PAD_ID  # ignored
    sums = task.eval_sums(logits, batch)
    metrics = task.finalize({k: float(v) for k, v in sums.items()})
    assert sums["count"].item() == 7
    assert metrics["loss"] == pytest.approx(math.log(VOCAB), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(VOCAB, rel=1e-4)
    assert metrics["bits_per_byte"] == pytest.approx(math.log2(VOCAB), rel=1e-5)


def test_bert_masking_proportions_and_replacement_rules() -> None:
    """SEEDS A16 (S3:2526-2531): selected tokens become [MASK] or a random token."""
    tokens = torch.randint(0, 256, (64, 128))
    masking = Masking()
    corrupted, selected = masking.apply(tokens)
    n = selected.sum().item()
    assert n / tokens.numel() == pytest.approx(0.15, abs=0.01)
    masked = (corrupted == MASK_ID) & selected
    changed = (corrupted != tokens) & selected & ~masked
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.03)
    # 10% random (a few draw their own token), 10% unchanged.
    assert changed.sum().item() / n == pytest.approx(0.1, abs=0.03)
    assert torch.equal(corrupted[~selected], tokens[~selected])  # the rest is untouched
    assert corrupted.max().item() <= MASK_ID and (corrupted[changed] < 256).all()
    again, _ = masking.apply(tokens)
    assert torch.equal(again, corrupted)  # deterministic
    other, _ = Masking(seed=1).apply(tokens)
    assert not torch.equal(other, corrupted)


def test_a_random_replacement_is_a_token_of_the_same_sample() -> None:
    """Word pieces or bytes alike: a random replacement comes from the sample's own tokens
    (never an id the vocabulary lacks), and a sample's corruption ignores its batch-mates."""
    tokens = torch.randint(300, 5000, (16, 64))  # word-piece ids beyond the bytes
    tokens[3, 40:] = PAD_ID
    corrupted, selected = Masking().apply(tokens)
    changed = (corrupted != tokens) & selected & (corrupted != MASK_ID)
    assert changed.any()
    for row, col in changed.nonzero().tolist():
        assert corrupted[row, col] in tokens[row] and corrupted[row, col] != PAD_ID
    alone, _ = Masking().apply(tokens[5:6])
    assert torch.equal(alone, corrupted[5:6])


def test_masked_lm_loss_covers_only_selected_positions() -> None:
    task = build_task("masked_lm", LossConfig())
    tokens = torch.randint(0, 256, (4, 32))
    batch = {"input": tokens, "target": tokens}
    targets = task.targets(batch)
    _, selected = task.masking.apply(tokens)
    assert torch.equal(targets != PAD_ID, selected)
    assert torch.equal(targets[selected], tokens[selected])
    config = models.BuildConfig(input_shape=(32,), num_classes=VOCAB)
    loss = task.loss(task.forward(models.get("bert").build(config), batch), batch)
    loss.backward()
    assert loss.item() > 0
