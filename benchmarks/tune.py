"""ASHA against running every trial to completion: an 8-trial sweep on the digits quickstart.

Three runs on the embedded cluster, 2 workers per trial, all at `trainer.max_epochs=EPOCHS`:
the quickstart's default config (one `roundhouse train`), the sweep with ASHA, and the same 8
trials (the seeded random searcher samples the same values) with FIFO, i.e. all run to the
end. ASHA should reach at least the default config's accuracy in at most half the wall time.

    RESULT tune_wall_time ours=<ASHA s> baseline=<FIFO s> ratio=<ASHA/FIFO> unit=s
    RESULT tune_best_val_accuracy ours=<best ASHA trial> baseline=<default config> ratio=...
    RESULT tune_best_test_accuracy ours=<its test accuracy> baseline=<default config's> ...
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
EPOCHS = int(os.environ.get("TUNE_BENCH_EPOCHS", "20"))
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
    args = [ROUNDHOUSE, "tune", str(JOB), *SEARCH, "--samples", "8"]
    args += ["--scheduler", scheduler, "--metric", "val/accuracy", "--reduction-factor", "4"]
    elapsed, out = run([*args, *overrides(storage)])
    best = out.split("best job: ")[-1].strip()
    header = Path(best).read_text().splitlines()[0]  # "# best trial <id> of tune-<id>: ..."
    trial = header.split()[3]
    return elapsed, Path(best).parent / trial


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rh-tune-bench-") as tmp:
        storage = Path(os.environ.get("TUNE_BENCH_STORAGE", tmp))
        run([ROUNDHOUSE, "train", str(JOB), *overrides(storage / "default")])
        default = next((storage / "default" / "quickstart").iterdir())
        asha_s, asha_best = sweep(storage / "asha", "asha")
        fifo_s, fifo_best = sweep(storage / "fifo", "fifo")
        print(f"best trials: asha {asha_best.name}, fifo {fifo_best.name}")
        for name, ours, base, unit in (
            ("tune_wall_time", asha_s, fifo_s, "s"),
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
