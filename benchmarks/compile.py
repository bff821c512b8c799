"""Speedup of `trainer.compile: true` (torch.compile, inductor) per model family, through
roundhouse's own loop on the `single` strategy.

For each family (a CNN, gpt, an RNN language model) every round trains the job once eager and
once compiled, interleaved so both share the machine's load. A run's figure is the median of
its logged `train/samples_per_s` windows, the first (warm-up, compilation) excluded; a
family's figure is the median over rounds. Inductor's on-disk cache makes later rounds'
compilation cheap, but only steady-state windows count anyway.

    python benchmarks/compile.py [--families cnn gpt rnn] [--rounds 2] [--steps 30]
    python benchmarks/compile.py --device cuda --families gpt   # on a GPU

Prints `RESULT compile_<family> ours=<compiled samples/s> baseline=<eager samples/s> ...`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from roundhouse.config.loading import validate_job
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run

PYTEXT = {"source": "builtin:pytext", "options": {"seq_len": 256, "max_bytes": 2_000_000}}
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "cnn": (
        {"name": "resnet", "flavor": "debug"},
        {"source": "builtin:synthetic", "options": {"shape": [3, 32, 32], "num_samples": 4096}},
    ),
    "gpt": ({"name": "gpt", "flavor": "small"}, PYTEXT),
    "rnn": ({"name": "rnn", "flavor": "small"}, PYTEXT),
}
BATCH = {"cnn": 64, "gpt": 8, "rnn": 32}


def make_job(storage: str, family: str, args: argparse.Namespace, compile_: bool) -> dict:
    model, data = FAMILIES[family]
    return {
        "name": f"compile_{family}",
        "model": model,
        "data": {**data, "batch_size": BATCH[family], "split": [0.98, 0.01, 0.01]},
        "trainer": {
            "max_steps": args.steps,
            "log_every_steps": args.window,
            "device": args.device,
            "compile": compile_,
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            "optimizer": {"name": "adamw", "lr": 1e-3},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
        "storage": {"path": storage},
    }


def rate(family: str, args: argparse.Namespace, compile_: bool) -> float:
    """Median samples/s of one run (first logged window excluded)."""
    with tempfile.TemporaryDirectory() as storage:
        job = validate_job(make_job(storage, family, args, compile_))
        prepared = prepare_run(job)
        run_worker(prepared.job, build_local_context(args.device))
        path = Path(prepared.run_dir.url) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.open()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for family in args.families:
        eager, compiled = [], []
        for r in range(args.rounds):
            eager.append(rate(family, args, False))
            compiled.append(rate(family, args, True))
            print(
                f"{family} round {r}: eager={eager[-1]:.2f} compiled={compiled[-1]:.2f} samples/s",
                flush=True,
            )
        o, b = statistics.median(compiled), statistics.median(eager)
        print(
            f"RESULT compile_{family} ours={o:.4g} baseline={b:.4g} ratio={o / b:.3f} "
            "unit=samples/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
