"""Regression: an MLP trained by roundhouse against scikit-learn's LinearRegression.

Both see the same data and split: `builtin:diabetes` (scikit-learn's diabetes, 442 patients,
10 standardized features, a standardized disease-progression value) cut by `build_splits` with
the job's seed, exactly as `roundhouse train` cuts it. Ours is `configs/regression_diabetes.yaml`
trained with `--local` through the real job path (`train_local`); its figure is the run's own
`test/r2`. The baseline is ordinary least squares fitted on the train split and scored with
`sklearn.metrics.r2_score` on the test split. Diabetes is nearly linear and small, so the
target (ratio >= 0.9) shows that the regression path (data, loss, metrics) is right rather
than that an MLP beats a line. `--seeds` repeats with other seeds (other splits) and reports
the median ratio.

    python benchmarks/regression.py [--seeds 0 1 2] [--epochs 60]

Ends with `RESULT regression_r2 ours=<r2> baseline=<r2> ratio=<ours/baseline> unit=r2`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import yaml

from roundhouse.config.loading import validate_job
from roundhouse.data import build_splits
from roundhouse.launch.local import train_local

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "regression_diabetes.yaml"


def job_for(seed: int, epochs: int, storage: str) -> dict:
    """The shipped config with this seed, no tracking, runs under `storage`."""
    job = yaml.safe_load(CONFIG.read_text())
    job["trainer"].update(seed=seed, max_epochs=epochs)
    job["tracking"] = {"wandb": {"mode": "disabled"}, "console": "off"}
    job["storage"] = {"path": storage}
    return job


def ours(seed: int, epochs: int, storage: str) -> float:
    """Test R² of the MLP trained by roundhouse."""
    metrics = train_local(validate_job(job_for(seed, epochs, storage)))
    return float(metrics["test/r2"])


def baseline(seed: int) -> float:
    """Test R² of LinearRegression fitted on the same train split."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    spec = validate_job(job_for(seed, 1, "/tmp"))
    splits = build_splits(spec.data, seed=seed)
    model = LinearRegression().fit(splits.train.inputs.numpy(), splits.train.targets.numpy())
    return float(r2_score(splits.test.targets.numpy(), model.predict(splits.test.inputs.numpy())))


def main() -> None:
    """Run every seed, print one line per seed and the RESULT line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as storage:
        for seed in args.seeds:
            row = (ours(seed, args.epochs, storage), baseline(seed))
            rows.append(row)
            print(f"seed {seed}: mlp r2 {row[0]:.4f}, linear r2 {row[1]:.4f}")
    mine = statistics.median(r for r, _ in rows)
    theirs = statistics.median(b for _, b in rows)
    ratio = statistics.median(r / b for r, b in rows)
    print(f"RESULT regression_r2 ours={mine:.4f} baseline={theirs:.4f} ratio={ratio:.3f} unit=r2")


if __name__ == "__main__":
    main()
