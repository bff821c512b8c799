"""Sparse parameter server vs ring all-reduce on fastText with a 2^21-row table.

The same job (fasttext `base`: 2^21 hashed byte n-gram buckets x 16, a linear head; adagrad;
builtin:pydoc-cls; global batch `--batch-size`) runs as

- `single`: one process (the accuracy reference);
- `ring`: 2 gloo processes, the table's gradient all-reduced dense (`sparse_gradients: dense`);
- `ring_gather`: 2 gloo processes, the touched rows all-gathered (`sparse_gradients: gather`);
- `ps`: 2 gloo processes and 2 server shards (sync), pushing and pulling only the rows each
  batch touches.

The shards run in a `multiprocessing` manager process (`roundhouse/parallel/ps/manager.py`:
the real server code, without Ray's startup cost on a shared machine); the ranks run the real
`run_worker`. Throughput: training samples between the end of the first and of the last epoch
(both synchronised by validation) over the wall time between them. Bytes per step and worker,
sent plus received: ps's row traffic as the strategy measures it (`train/ps_row_bytes_per_step`)
plus the dense head's push and pull; ring's all-reduce moves 2 (N - 1) / N of the gradient each
way per rank.

    python benchmarks/sparse_ps.py [--epochs 3] [--batch-size 64] [--buckets 2097152]

RESULT lines: `sparse_ps_vs_ring` (samples/s, target >= 5), `sparse_ps_bytes_vs_ring` (target
<= 0.05), `ring_gather_vs_ring` (samples/s; no target), and the test accuracy of ps and ring
against single (target: within 0.01).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from roundhouse.config.loading import validate_job
from roundhouse.data import build_splits
from roundhouse.data.sampler import BatchPlan
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.ps.manager import Address, connect_store, shard_manager
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.dist import run_distributed

logger = logging.getLogger("sparse_ps")
TIMEOUT_S = 1800
WORLD = 2
SERVERS = 2

VARIANTS: dict[str, dict[str, Any]] = {
    "single": {"kind": "single"},
    "ps": {"kind": "ps", "num_servers": SERVERS, "node_aggregation": False},
    "ring": {"kind": "ring", "sparse_gradients": "dense"},
    "ring_gather": {"kind": "ring", "sparse_gradients": "gather"},
}


def build_job(name: str, strategy: dict[str, Any], args: argparse.Namespace, storage: str) -> dict:
    return {
        "name": name,
        "model": {"name": "fasttext", "flavor": "base", "options": {"buckets": args.buckets}},
        "data": {"source": "builtin:pydoc-cls", "batch_size": args.batch_size},
        "trainer": {
            "max_epochs": args.epochs,
            "log_every_steps": 5,
            "device": "cpu",
            "optimizer": {"name": "adagrad", "lr": 0.5},
            "checkpoint": {"every_epoch": False},
        },
        "strategy": strategy,
        "cluster": {"num_workers": 1 if strategy["kind"] == "single" else WORLD},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": storage},
    }


def rank_main(rank: int, world_size: int, job: dict, address: Address | None) -> dict:
    ctx = WorkerContext(rank=rank, world_size=world_size, node_rank=rank, num_nodes=world_size)
    if address is not None:
        ctx = WorkerContext(**{**ctx.__dict__, "services": {"ps": connect_store(address, SERVERS)}})
    return run_worker(validate_job(job), ctx)


def run(job: dict) -> Path:
    prepared = prepare_run(validate_job(job))
    job = {**job, "storage": {**job["storage"], "run_id": prepared.run_dir.url.rsplit("/", 1)[-1]}}
    kind = job["strategy"]["kind"]
    if kind == "single":
        run_worker(prepared.job, build_local_context("cpu"))
    elif kind == "ps":
        with shard_manager() as address:
            run_distributed(rank_main, WORLD, TIMEOUT_S, job, address)
    else:
        run_distributed(rank_main, WORLD, TIMEOUT_S, job, None)
    return Path(prepared.run_dir.url)


def measure(run_dir: Path, job: dict) -> dict[str, float]:
    """samples/s between the first and last epoch ends, test accuracy, mean row bytes/step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in rows if "val/loss" in r]
    spec = validate_job(job)
    n = len(build_splits(spec.data, seed=spec.trainer.seed).train)
    workers = spec.cluster.num_workers
    plan = BatchPlan(n, spec.data.batch_size, workers, 1, spec.data.drop_last)
    per_epoch = sum(b - a for a, b in map(plan.step_bounds, range(plan.num_steps)))
    samples = (ends[-1]["epoch"] - ends[0]["epoch"]) * per_epoch
    traffic = [r["train/ps_row_bytes_per_step"] for r in rows if "train/ps_row_bytes_per_step" in r]
    return {
        "samples_per_s": samples / (ends[-1]["time"] - ends[0]["time"]),
        "accuracy": rows[-1]["test/accuracy"],
        "row_bytes": sum(traffic) / len(traffic) if traffic else 0.0,
    }


def result(name: str, ours: float, baseline: float, unit: str) -> None:
    ratio = ours / baseline if baseline else float("nan")
    print(f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.4f} unit={unit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--buckets", type=int, default=2**21)
    parser.add_argument("--only", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    storage = tempfile.mkdtemp(prefix="sparse_ps-")
    jobs = {n: build_job(n, v, args, storage) for n, v in VARIANTS.items() if n in args.only}
    got = {}
    for name, job in jobs.items():
        got[name] = measure(run(job), job)
        logger.info("%s: %s", name, got[name])
    table = (args.buckets + 1) * 16
    dense = 16 * 20 + 20  # the head (pydoc-cls has 20 classes), pushed and pulled whole
    ring_bytes = 2 * 2 * (WORLD - 1) / WORLD * (table + dense) * 4
    if {"ps", "ring"} <= got.keys():
        result(
            "sparse_ps_vs_ring",
            got["ps"]["samples_per_s"],
            got["ring"]["samples_per_s"],
            "samples/s",
        )
        ps_bytes = got["ps"]["row_bytes"] + 2 * dense * 4
        result("sparse_ps_bytes_vs_ring", ps_bytes, ring_bytes, "bytes/step/worker")
    if {"ring_gather", "ring"} <= got.keys():
        result(
            "ring_gather_vs_ring",
            got["ring_gather"]["samples_per_s"],
            got["ring"]["samples_per_s"],
            "samples/s",
        )
    for name in ("ps", "ring", "ring_gather"):
        if {name, "single"} <= got.keys():
            result(
                f"{name}_accuracy_vs_single",
                got[name]["accuracy"],
                got["single"]["accuracy"],
                "accuracy",
            )


if __name__ == "__main__":
    main()
