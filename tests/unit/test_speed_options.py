"""RoPE's fast rotation against the textbook one, its cached tables, and the compile option's
job check."""

from __future__ import annotations

import pytest
import torch

from roundhouse import models
from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.models.attention import RopeTables, RotatePairs, apply_rope, rope_angles


def textbook_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The RoFormer rotation written pair by pair (the implementation before the fast one)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


def test_fast_rotation_equals_textbook_forward_and_backward() -> None:
    torch.manual_seed(0)
    cos, sin = rope_angles(12, 8, offset=5)
    x = torch.randn(2, 12, 3, 8, dtype=torch.float64, requires_grad=True)  # (B, T, H, D)
    c, s = cos.double()[:, None], sin.double()[:, None]  # (T, 1, D/2)
    torch.testing.assert_close(apply_rope(x, c, s), textbook_rope(x, c, s))
    torch.autograd.gradcheck(lambda t: apply_rope(t, c, s), (x,))


def test_complex_rotation_equals_the_pairs_rotation_forward_and_backward() -> None:
    """float32 rotates as complex numbers, bf16 (and compiled code) as swapped pairs."""
    torch.manual_seed(0)
    tables = RopeTables(8)
    x = torch.randn(2, 12, 3, 8, requires_grad=True)  # (B, T, H, D)
    complex_out = tables.rotate(x, 5)
    cos, sin = tables.get(12, 5, "cpu", torch.float32)
    pairs_out = RotatePairs.apply(x, cos[:, None], sin[:, None])
    torch.testing.assert_close(complex_out, pairs_out)
    grad = torch.randn_like(complex_out).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    (complex_grad,) = torch.autograd.grad(complex_out, x, grad)
    (pairs_grad,) = torch.autograd.grad(pairs_out, x, grad)
    torch.testing.assert_close(complex_grad, pairs_grad)
    half = tables.rotate(x.detach().bfloat16(), 5)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), pairs_out.detach(), atol=0.05, rtol=0.02)


def test_cached_tables_slice_like_fresh_angles_and_stay_out_of_state_dict() -> None:
    tables = RopeTables(16)
    x = torch.randn(1, 2, 7, 16)
    for length, offset in ((4, 0), (7, 30), (3, 2)):  # the second call grows the cache
        cos, sin = tables.get(length, offset, "cpu", torch.float32)
        fresh = rope_angles(length, 16, offset=offset)
        torch.testing.assert_close(
            apply_rope(x[:, :, :length], cos, sin), textbook_rope(x[:, :, :length], *fresh)
        )
    config = models.BuildConfig("debug", input_shape=(16,), num_classes=260)
    model = models.get("gpt").build(config)
    model(torch.zeros(1, 16, dtype=torch.long))
    assert not any("rope" in key for key in model.state_dict())


def test_compile_with_pipeline_stages_is_a_job_error() -> None:
    job = {
        "name": "x",
        "model": {"name": "gpt"},
        "trainer": {"max_steps": 1, "compile": True},
        "strategy": {"kind": "deepspeed", "pipeline_stages": 2},
    }
    with pytest.raises(JobFileError, match=r"trainer\.compile"):
        validate_job(job)
    job["trainer"]["compile"] = False
    assert validate_job(job).trainer.compile_mode == "default"
