"""Helpers to find and read run folders in tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def only_run(storage: Path, name: str) -> Path:
    """The single run folder of job `name` under `storage`."""
    runs = sorted(p for p in (storage / name).iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Model weights of the run's latest checkpoint."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run / "checkpoints" / latest / "state.pt", weights_only=True)
    return state["strategy"]["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"
