"""Every sequence model's debug flavor learns builtin:pytext in 20 steps, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from roundhouse.launch.cli import main
from tests.helpers.runs import only_run, read_metrics

ROOT = Path(__file__).resolve().parents[2]
MODELS = ["gpt", "bert", "moe", "lstm_lm", "gru_lm", "rnn_lm"]


def train(tmp_path: Path, config: str, *overrides: str) -> list[dict]:
    args = [
        "train",
        str(ROOT / "configs" / config),
        "--local",
        "trainer.max_steps=20",
        "trainer.log_every_steps=1",
        "trainer.eval_every_steps=20",
        "trainer.scheduler.name=constant",
        "trainer.optimizer.lr=0.003",
        "trainer.checkpoint.every_steps=20",
        "data.batch_size=16",
        "data.options={seq_len: 32, max_bytes: 150000}",
        "tracking.wandb.mode=disabled",
        "tracking.console=off",
        f"storage.path={tmp_path}",
        *overrides,
    ]
    assert main(args) == 0
    return read_metrics(only_run(tmp_path, config.removesuffix(".yaml")))


@pytest.mark.parametrize("name", MODELS)
def test_debug_flavor_loss_falls_on_pytext_in_20_steps(name: str, tmp_path: Path) -> None:
    recurrent = name.endswith("_lm")
    # Recurrent nets need a larger step to leave the uniform start within 20 steps.
    lr = "trainer.optimizer.lr=0.01" if recurrent else "trainer.optimizer.lr=0.003"
    rows = train(tmp_path, "gpt_pytext.yaml", f"model.name={name}", "model.flavor=debug", lr)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, (first, last)  # from about ln(260) = 5.56
    final = {k: v for row in rows for k, v in row.items()}  # the last value of every metric
    assert final["test/bits_per_byte"] > 0 and final["val/perplexity"] > 1
    if name == "moe":
        assert sum(final[f"val/expert{i}_frac"] for i in range(4)) == pytest.approx(1.0)


def test_lstm_config_runs(tmp_path: Path) -> None:
    rows = train(tmp_path, "lstm_pytext.yaml", "model.flavor=debug")
    assert "test/accuracy" in rows[-1]
