"""The transfer benchmark's protocol (`benchmarks/transfer.py`): each arm keeps the lr of its
best final *validation* accuracy, and the pretraining cache keys carry a per-family version."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def transfer():
    spec = importlib.util.spec_from_file_location("transfer_bench", ROOT / "benchmarks/transfer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(lr: float, val: list[float], test: float) -> dict:
    return {"lr": lr, "curve": list(enumerate(val, 1)), "test/accuracy": test}


def test_best_on_val_uses_the_final_validation_accuracy_only(transfer, capsys):
    runs = [
        run(1e-4, [0.2, 0.5, 0.30], test=0.9),  # best mid-run and on test: not chosen
        run(2e-4, [0.2, 0.3, 0.40], test=0.1),
        run(5e-4, [0.1, 0.2, 0.35], test=0.5),
    ]
    assert transfer.best_on_val("bert", "scratch", runs)["lr"] == 2e-4
    printed = capsys.readouterr().out
    assert "lr=0.0002 final_val_accuracy=0.4000" in printed
    assert "test" not in printed  # the grid never shows the test split


def test_best_on_val_ties_keep_the_earlier_lr(transfer):
    runs = [run(1e-4, [0.3], 0.0), run(2e-4, [0.3], 0.0), run(5e-4, [0.2], 0.0)]
    assert transfer.best_on_val("bert", "pretrained", runs)["lr"] == 1e-4


def test_lr_grid_parses_comma_separated_rates(transfer):
    assert transfer.lr_list("1e-4, 2e-4,5e-4,") == [1e-4, 2e-4, 5e-4]


def test_cache_key_is_versioned_for_the_masked_lm_only(transfer, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["transfer.py"])
    args = transfer.parse_args()
    data = transfer.corpus(args, "pydoc")
    for family in ("bert", "gpt"):
        model = {"name": family, "flavor": "debug"}
        trainer = {"max_steps": 10, "eval_every_steps": 10, "lr": 1e-3}
        spec = transfer.job("p", model, data, trainer, str(tmp_path), args)
        plain = spec.model_dump_json(exclude={"storage"})
        unversioned = hashlib.sha256(plain.encode()).hexdigest()[:12]
        assert (transfer.cache_key(family, spec) == unversioned) == (family == "gpt")
