"""CUDA paths: device auto-selection and bf16 autocast. Skipped where CUDA is absent."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from roundhouse.config import OptimizerConfig
from roundhouse.launch.cli import main
from roundhouse.parallel.context import resolve_device
from roundhouse.trainer.optim import build_optimizer
from roundhouse.trainer.run import autocast_dtype
from tests.helpers.runs import only_run, read_metrics

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_auto_device_is_cuda_with_bf16_autocast() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert autocast_dtype("auto", device) is torch.bfloat16


def test_quickstart_trains_on_cuda_in_bf16(tmp_path: Path) -> None:
    args = [
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--local",
        "trainer.max_epochs=5",
        "tracking.wandb.mode=disabled",
        f"storage.path={tmp_path}",
    ]
    assert main(args) == 0
    final = read_metrics(only_run(tmp_path, "quickstart"))[-1]
    assert final["test/accuracy"] > 0.9


def test_adamw_on_cuda_is_fused_and_steps_like_torchs_foreach_kernels() -> None:
    torch.manual_seed(0)
    fused_layer = nn.Linear(64, 32).cuda()
    foreach_layer = copy.deepcopy(fused_layer)
    config = OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(fused_layer.parameters(), config)
    foreach = torch.optim.AdamW(foreach_layer.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    assert fused.param_groups[0]["fused"] is True
    x = torch.randn(16, 64, device="cuda")
    for _ in range(3):
        for layer, opt in ((fused_layer, fused), (foreach_layer, foreach)):
            opt.zero_grad()
            layer(x).square().sum().backward()
            opt.step()
    torch.testing.assert_close(fused_layer.weight, foreach_layer.weight)
