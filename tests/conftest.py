"""Shared test settings: quiet, offline W&B; one DeepSpeed extension cache; no GPU assumptions."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.helpers.dist import PRELOAD

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# Tests never talk to a W&B server: `auto` must resolve to offline.
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)
# Ray reads its auth token once per process: every cluster this test process starts or joins
# (embedded ones and tests/helpers/ray_cluster.py's) uses this one, so a later cluster can be
# joined after an earlier one.
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# Before anything starts the fork server (tests/helpers/dist.py's ranks, the ps shard manager).
mp.set_forkserver_preload(PRELOAD)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
