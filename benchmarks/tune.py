"""ASHA against running every trial to completion: an 8-trial sweep on the digits quickstart.

Three runs on the embedded cluster, 2 workers per trial (one trial's worker group at a time
on a small machine), all at `trainer.max_epochs=EPOCHS`: the quickstart's default config (one
`roundhouse train`), the sweep with ASHA, and the same 8 trials with FIFO, i.e. all run to the
end. Both sweeps sample the same 8 configs (the random searcher is seeded by `trainer.seed`;
the benchmark checks that the configs match) and run with the same settings; W&B is off in
all three runs. ASHA should reach at least the default config's accuracy in at most half the
wall time.

The settings are what a user tuning this job would pick:
- `EPOCHS=50`: a sweep's trials are as long as a real training run of the job (the quickstart
  trains 30 epochs; 50 lets the cosine schedule of a smaller learning rate finish). Early
  stopping exists for trials of real length: the longer a trial, the more ASHA saves, and a
  sweep of 2-epoch trials would measure process start-up, not the scheduler.
- `--grace-period 1` and `--reduction-factor 4`: Ray Tune's own ASHA defaults. One epoch is
  enough on digits: after it, learning rates that train are already far ahead of those that
  do not (val accuracy ~0.9 against 0.1-0.3).

    RESULT tune_wall_time ours=<ASHA s> baseline=<FIFO s> ratio=<ASHA/FIFO> unit=s
    RESULT tune_best_val_accuracy ours=<best ASHA trial> baseline=<default config> ratio=...
    RESULT tune_best_test_accuracy ours=<its test accuracy> baseline=<default config's> ...
    RESULT tune_trial_epochs ours=<epochs ASHA trained> baseline=<FIFO's> ratio=... unit=epoch
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDHOUSE = str(Path(sys.executable).with_name("roundhouse"))
JOB = ROOT / "configs" / "quickstart.yaml"
EPOCHS = int(os.environ.get("TUNE_BENCH_EPOCHS", "50"))
GRACE_PERIOD, REDUCTION_FACTOR = "1", "4"
SEARCH = [
    "--search",
    "trainer.optimizer.lr=loguniform(1e-4,1e-2)",
    "--search",
    "model.options.dropout=choice(0,0.1,0.3)",
]


def overrides(storage: Path) -> list[str]:
    return [
        f"trainer.max_epochs={EPOCHS}",
        f"storage.path={storage}",
        "tracking.wandb.mode=disabled",
        "tracking.console=plain",
    ]


def run(args: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    print(f"{' '.join(args[1:3])} ... {elapsed:.0f} s", flush=True)
    print(result.stdout, flush=True)  # the sweep's results table
    return elapsed, result.stdout


def final_metric(run_dir: Path, metric: str) -> float:
    """The last logged value of `metric` in a run folder."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[metric] for row in rows if metric in row][-1]


def sweep(storage: Path, scheduler: str) -> tuple[float, Path]:
    args = [ROUNDHOUSE, "tune", str(JOB), *SEARCH, "--samples", "8", "--scheduler", scheduler]
    args += ["--metric", "val/accuracy", "--grace-period", GRACE_PERIOD]
    args += ["--reduction-factor", REDUCTION_FACTOR]
    elapsed, out = run([*args, *overrides(storage)])
    best = out.split("best job: ")[-1].strip()
    header = Path(best).read_text().splitlines()[0]  # "# best trial <id> of tune-<id>: ..."
    trial = header.split()[3]
    return elapsed, Path(best).parent / trial


def trial_configs(sweep: Path) -> dict[str, tuple[str, ...]]:
    """Trial number (`<experiment>_<number>`) -> its searched values, from results.tsv."""
    rows = [line.split("\t") for line in (sweep / "results.tsv").read_text().splitlines()]
    width = len(SEARCH) // 2
    return {row[0].rsplit("_", 1)[-1]: tuple(row[1 : 1 + width]) for row in rows[1:]}


def trained_epochs(sweep: Path) -> int:
    """Epochs the sweep's trials trained, all together (one evaluation per epoch)."""
    total = 0
    for metrics in sweep.glob("*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        total += sum(1 for row in rows if "val/accuracy" in row)
    return total


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rh-tune-bench-") as tmp:
        storage = Path(os.environ.get("TUNE_BENCH_STORAGE", tmp))
        run([ROUNDHOUSE, "train", str(JOB), *overrides(storage / "default")])
        default = next((storage / "default" / "quickstart").iterdir())
        asha_s, asha_best = sweep(storage / "asha", "asha")
        fifo_s, fifo_best = sweep(storage / "fifo", "fifo")
        print(f"best trials: asha {asha_best.name}, fifo {fifo_best.name}")
        configs = trial_configs(asha_best.parent)
        if configs != trial_configs(fifo_best.parent):
            sys.exit(f"the two sweeps sampled different trials: {configs} and fifo's")
        for number, values in sorted(configs.items()):
            print(f"trial {number}: {' '.join(values)}")
        for name, ours, base, unit in (
            ("tune_wall_time", asha_s, fifo_s, "s"),
            (
                "tune_trial_epochs",
                trained_epochs(asha_best.parent),
                trained_epochs(fifo_best.parent),
                "epoch",
            ),
            (
                "tune_best_val_accuracy",
                final_metric(asha_best, "val/accuracy"),
                final_metric(default, "val/accuracy"),
                "accuracy",
            ),
            (
                "tune_best_test_accuracy",
                final_metric(asha_best, "test/accuracy"),
                final_metric(default, "test/accuracy"),
                "accuracy",
            ),
        ):
            print(
                f"RESULT {name} ours={ours:.4f} baseline={base:.4f} "
                f"ratio={ours / base:.3f} unit={unit}"
            )


if __name__ == "__main__":
    main()
