"""Acceptance checks of the foundation issue, through the real CLI and trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

from roundhouse.launch.cli import main
from tests.helpers.runs import only_run, read_metrics
from tests.helpers.wandb_reader import find_wandb_file, read_summary

ROOT = Path(__file__).resolve().parents[2]
CNNS = ["mlp", "lenet", "alexnet", "vgg", "nin", "googlenet", "resnet", "densenet"]


@pytest.mark.parametrize("name", CNNS)
def test_every_cnn_debug_flavor_learns_digits_in_20_steps(name: str, tmp_path: Path) -> None:
    args = [
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "--local",
        f"model.name={name}",
        "model.options={}",
        "trainer.max_steps=20",
        "trainer.log_every_steps=1",
        "trainer.scheduler.name=constant",
        "trainer.optimizer.lr=0.001",
        "data.augment.rotation=0",
        "data.augment.translate=0",
        "tracking.wandb.mode=disabled",
        "tracking.console=off",
        f"storage.path={tmp_path}",
    ]
    assert main(args) == 0
    losses = [
        r["train/loss"] for r in read_metrics(only_run(tmp_path, "quickstart")) if "train/loss" in r
    ]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.02, (first, last)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_reaches_97_percent_on_digits(tmp_path: Path) -> None:
    """`make demo`'s job: 2 Ray workers with the ring reach >= 97% test accuracy; the run
    folder holds everything promised."""
    args = ["train", str(ROOT / "configs" / "quickstart.yaml"), f"storage.path={tmp_path}"]
    assert main(args) == 0
    run = only_run(tmp_path, "quickstart")
    final = read_metrics(run)[-1]
    assert final["test/accuracy"] >= 0.97, final
    assert (run / "job.yaml").exists() and (run / "checkpoints" / "latest").exists()
    summary = read_summary(find_wandb_file(run))
    assert summary["test/accuracy"] == pytest.approx(final["test/accuracy"])


def test_the_readme_commands_work(tmp_path: Path) -> None:
    """The issue's tour: a model swap by override, resume of the latest run, a dry run."""
    base = ["train", str(ROOT / "configs" / "quickstart.yaml"), "--local"]
    quiet = ["tracking.wandb.mode=disabled", "tracking.console=off", f"storage.path={tmp_path}"]
    assert main([*base, "trainer.max_epochs=3", "model.name=vgg", *quiet]) == 0
    assert (
        main([*base, "--resume", "latest", "trainer.max_epochs=4", "model.name=vgg", *quiet]) == 0
    )
    rows = read_metrics(only_run(tmp_path, "quickstart"))
    assert rows[-1]["epoch"] == 3 and "test/accuracy" in rows[-1]
    assert main([*base, "--dry-run", *quiet]) == 0
