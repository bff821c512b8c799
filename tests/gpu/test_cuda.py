"""CUDA paths: device auto-selection and bf16 autocast. Skipped where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from roundhouse.launch.cli import main
from roundhouse.parallel.context import resolve_device
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
