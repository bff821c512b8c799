"""Regression: value targets from builtin:diabetes and `data prepare`, mse/l1/huber, MSE/MAE/R²
from sums over batches and ranks, and float labels refused by a classification task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from roundhouse.config import DataConfig, LossConfig
from roundhouse.data import build_splits
from roundhouse.launch.cli import main
from roundhouse.trainer.losses import build_loss
from roundhouse.trainer.task import build_task
from roundhouse.trainer.tasks_regression import RegressionTask
from tests.helpers.runs import read_metrics
from tests.unit.test_lora import train


def sums_of(task: RegressionTask, pred: torch.Tensor, target: torch.Tensor, parts: int) -> dict:
    """The task's eval sums over `parts` batches, added as the loop and the ranks add them."""
    total: dict[str, float] = {}
    for p, t in zip(pred.chunk(parts), target.chunk(parts), strict=True):
        for key, value in task.eval_sums(p, {"target": t}).items():
            total[key] = total.get(key, 0.0) + float(value)
    return total


@pytest.mark.parametrize("shape", [(), (3,)])
def test_r2_mse_mae_from_sums_equal_the_whole_split(shape: tuple[int, ...]) -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    gen = torch.Generator().manual_seed(0)
    target = torch.randn(50, *shape, generator=gen) * 3 + 1
    pred = target + torch.randn(50, *shape, generator=gen)
    task = build_task("regression", LossConfig(name="mse"))
    metrics = task.finalize(sums_of(task, pred.reshape(50, -1), target, parts=7))
    y, p = target.numpy().reshape(50, -1), pred.numpy().reshape(50, -1)
    assert metrics["r2"] == pytest.approx(r2_score(y, p), abs=1e-6)
    assert metrics["mse"] == pytest.approx(mean_squared_error(y, p), abs=1e-5)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y, p), abs=1e-5)
    assert metrics["loss"] == pytest.approx(mean_squared_error(y, p), abs=1e-5)


@pytest.mark.parametrize(
    ("name", "reference"),
    [("mse", F.mse_loss), ("l1", F.l1_loss), ("huber", F.huber_loss)],
)
def test_regression_losses_compare_values_as_they_are(name: str, reference) -> None:
    gen = torch.Generator().manual_seed(1)
    outputs, target = torch.randn(8, 2, generator=gen) * 2, torch.randn(8, 2, generator=gen)
    loss = build_loss(LossConfig(name=name))(outputs, target)
    torch.testing.assert_close(loss, reference(outputs, target))
    # Class labels still meet one-hot rows (the classification meaning of these losses).
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    one_hot = F.one_hot(labels, 2).float()
    torch.testing.assert_close(
        build_loss(LossConfig(name=name))(outputs, labels), reference(outputs, one_hot)
    )


def test_builtin_diabetes_is_scikit_learns_data_standardized() -> None:
    from sklearn.datasets import load_diabetes

    splits = build_splits(DataConfig(source="builtin:diabetes"), seed=0)
    assert splits.info.input_shape == (10,) and splits.info.target_shape == ()
    assert splits.info.num_classes == 1 and sum(splits.info.num_samples.values()) == 442
    assert splits.train.targets.dtype == torch.float32
    raw = load_diabetes(scaled=False)
    everything = torch.cat([splits.train.targets, splits.val.targets, splits.test.targets])
    expected = (raw.target - raw.target.mean()) / raw.target.std()
    np.testing.assert_allclose(np.sort(everything.numpy()), np.sort(expected), atol=1e-5)


def diabetes_job(storage: Path, **trainer: object) -> dict:
    return {
        "name": "reg",
        "model": {"name": "mlp", "options": {"hidden_sizes": [16]}},
        "data": {"source": "builtin:diabetes", "batch_size": 32},
        "trainer": {
            "max_steps": 40,
            "log_every_steps": 10,
            "device": "cpu",
            "loss": {"name": "mse"},
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_epoch": False},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage), "run_id": "reg"},
    }


def test_an_mlp_learns_diabetes_and_logs_regression_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = train(diabetes_job(tmp_path))
    final = read_metrics(run)[-1]
    assert {"test/mse", "test/mae", "test/r2", "test/loss"} <= set(final)
    assert final["test/r2"] > 0.2  # a constant predictor scores about 0
    assert "test/accuracy" not in final
    out = tmp_path / "reg.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "the regressor of mlp" in text and "accuracy" not in text


def test_float_labels_for_a_classification_task_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import yaml

    job = diabetes_job(tmp_path / "runs")
    job["trainer"]["loss"] = {"name": "cross_entropy"}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path), "--local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data builtin:diabetes has float value")
    assert "trainer.loss.name=cross_entropy" in err[0]
    assert not (tmp_path / "runs").exists()  # nothing written
    job["model"] = {"name": "gpt", "flavor": "debug"}  # a model whose task takes no values
    job["trainer"]["loss"] = {"name": "mse"}
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path), "--local", "--dry-run"]) == 2
    assert "task language_model" in capsys.readouterr().err


def test_tune_selects_on_regression_metrics(tmp_path: Path) -> None:
    from roundhouse.cluster.sweep.space import known_metrics
    from roundhouse.config.loading import validate_job

    job = validate_job(diabetes_job(tmp_path))
    assert known_metrics(job) == ["val/loss", "val/mae", "val/mse", "val/r2"]


def prepare(source: Path, url: Path, *flags: str) -> int:
    return main(["data", "prepare", str(source), str(url), "--split", "0.6,0.2,0.2", *flags])


def test_data_prepare_keeps_float_and_vector_targets_and_training_streams_them(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from roundhouse.data.streaming.index import read_index

    rng = np.random.default_rng(0)
    x = rng.random((120, 4), dtype=np.float32)
    y = np.stack([x @ [1.0, -2.0, 0.5, 0.0], x[:, 0] - x[:, 3]], axis=1) + 0.25
    np.savez(tmp_path / "vec.npz", x=x, y=y.astype(np.float32))
    assert prepare(tmp_path / "vec.npz", tmp_path / "vec") == 0
    index = read_index(str(tmp_path / "vec"))
    assert index.extra["target_shape"] == [2] and index.num_classes == 2
    job = diabetes_job(tmp_path / "runs", max_steps=30)
    job["data"] = {"train": {"url": str(tmp_path / "vec")}, "batch_size": 16}
    run = train(job)
    final = read_metrics(run)[-1]
    assert np.isfinite(final["test/r2"]) and final["test/mse"] > 0
    # One float value per row through a CSV column with a fractional part.
    rows = ["a,b,y"] + [f"{a:.3f},{b:.3f},{a - b + 0.5:.3f}" for a, b in x[:, :2]]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    assert prepare(tmp_path / "t.csv", tmp_path / "csv") == 0
    assert read_index(str(tmp_path / "csv")).extra["target_shape"] == []
    capsys.readouterr()
    assert prepare(tmp_path / "t.csv", tmp_path / "bad", "--target-kind", "class") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class labels must be integers" in err[0]
