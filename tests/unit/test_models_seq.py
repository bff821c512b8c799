"""Attention, RoPE and GPT: parity with torch, the notes' shapes, KV-cache generation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from roundhouse import models
from roundhouse.errors import ModelError
from roundhouse.models.attention import MultiHeadAttention, apply_rope, rope_angles, split_heads
from roundhouse.models.gpt import GPT

VOCAB = 260


def build(name: str, flavor: str = "debug", seq_len: int = 16, **options) -> nn.Module:
    config = models.BuildConfig(flavor, input_shape=(seq_len,), num_classes=VOCAB, options=options)
    return models.get(name).build(config)


def copy_from_torch(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    q, k, v = ref.in_proj_weight.chunk(3)
    bq, bk, bv = ref.in_proj_bias.chunk(3)
    with torch.no_grad():
        for proj, w, b in ((ours.q_proj, q, bq), (ours.k_proj, k, bk), (ours.v_proj, v, bv)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_attention_matches_torch_with_copied_weights(causal: bool) -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    ours = MultiHeadAttention(32, 4)
    copy_from_torch(ours, ref)
    x = torch.randn(2, 7, 32)
    mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1) if causal else None
    expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(ours(x, causal=causal), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_and_padding_match_torch() -> None:
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(16, 2, batch_first=True)
    ours = MultiHeadAttention(16, 2)
    copy_from_torch(ours, ref)
    x, context = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    expected, _ = ref(x, context, context, key_padding_mask=pad, need_weights=False)
    got = ours(x, context=context, key_padding_mask=pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_eight_heads_on_3x512_give_3x64_per_head_and_3x512_after_concat() -> None:
    """SEEDS A13 / F18 (S3:1723)."""
    x = torch.randn(1, 3, 512)
    attention = MultiHeadAttention(512, 8)
    heads = split_heads(attention.q_proj(x), 8)
    assert heads.shape == (1, 8, 3, 64)
    assert attention(x).shape == (1, 3, 512)


def test_rope_preserves_norms_and_scores_depend_only_on_position_difference() -> None:
    """SEEDS A13 (S3:1663-1691): rotation keeps norms; q.k depends on m - n only."""
    torch.manual_seed(0)
    dim = 16
    q, k = torch.randn(dim), torch.randn(dim)
    cos, sin = rope_angles(40, dim)

    def rotate(vector: torch.Tensor, position: int) -> torch.Tensor:
        one = vector.view(1, 1, 1, dim)
        return apply_rope(one, cos[position], sin[position]).view(dim)

    for m in (0, 3, 17):
        torch.testing.assert_close(rotate(q, m).norm(), q.norm())
    score = [rotate(q, m) @ rotate(k, m - 5) for m in (5, 12, 39)]
    torch.testing.assert_close(torch.stack(score), score[0].expand(3), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(rotate(q, 9) @ rotate(k, 2), score[0], atol=1e-3)


@pytest.mark.parametrize("options", [{}, {"positions": "learned"}, {"norm": "post"}])
def test_kv_cache_greedy_generation_equals_full_forward(options: dict) -> None:
    torch.manual_seed(0)
    model = build("gpt", seq_len=32, **options).eval()
    prompt = torch.randint(0, 256, (2, 5))
    cached = model.generate(prompt, 12, use_cache=True)
    uncached = model.generate(prompt, 12, use_cache=False)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, uncached)
    # Each generated token is the argmax of one full forward pass over its prefix.
    logits = model(cached[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), cached[:, 5:])


def test_gpt_is_causal_and_ties_weights() -> None:
    model = build("gpt").eval()
    assert model.head.proj.weight is model.embed.tok.weight
    tokens = torch.randint(0, 256, (1, 16))
    changed = tokens.clone()
    changed[0, 10] = (changed[0, 10] + 1) % 256
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the past never sees the future
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    assert build("gpt", tie_weights=False).head.proj.weight is not None


def test_gpt_pipeline_layers_compose_to_forward() -> None:
    model = build("gpt").eval()
    tokens = torch.randint(0, 256, (2, 16))
    x = tokens
    for layer in models.get("gpt").pipeline_layers(model):
        x = layer(x)
    torch.testing.assert_close(x, model(tokens))


def test_gpt_flavor_sizes_and_flops() -> None:
    spec = models.get("gpt")
    with torch.device("meta"):
        small = build("gpt", "small", seq_len=128)
    count = sum(p.numel() for p in small.parameters())
    assert 9e6 < count < 12e6  # "~10M"
    assert set(spec.flavors) >= {"debug", "small", "124m", "350m", "1.3b"}
    config = models.BuildConfig("small", input_shape=(128,), num_classes=VOCAB)
    flops = spec.flops_per_sample(config)
    # Forward ~ 2 x params x tokens, plus attention: within 25% of that rule of thumb.
    assert 2 * count * 128 < flops < 1.25 * 2 * count * 128


def test_learned_positions_do_not_extrapolate_but_rope_does() -> None:
    with pytest.raises(ModelError, match="exceed"):
        build("gpt", seq_len=8, positions="learned")(torch.zeros(1, 9, dtype=torch.long))
    assert build("gpt", seq_len=8)(torch.zeros(1, 20, dtype=torch.long)).shape == (1, 20, VOCAB)


def test_gpt_rejects_image_inputs_and_bad_options() -> None:
    with pytest.raises(ModelError, match="token sequences"):
        models.get("gpt").build(models.BuildConfig(input_shape=(1, 8, 8)))
    with pytest.raises(ModelError, match="positions"):
        build("gpt", positions="sinusoid")


@pytest.mark.parametrize("name", ["gpt", "bert", "moe", "lstm_lm", "gru_lm", "rnn_lm"])
def test_debug_flavor_forward_backward(name: str) -> None:
    torch.manual_seed(0)  # every MoE expert gets tokens with this seed
    model = build(name)
    logits = model(torch.randint(0, 256, (2, 16)))
    assert logits.shape == (2, 16, VOCAB)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad), name
    assert isinstance(build("gpt"), GPT)
