"""Model FLOPs utilization (MFU) of roundhouse's GPT, trained through roundhouse's own loop.

One run measures both sides on the same device, interleaved:
- the model FLOP/s the loop achieves: `3 x flops_per_sample` (forward + backward, the model's
  own count, PaLM convention) times the median of the `train/samples_per_s` windows the loop
  logs to `metrics.jsonl` (the first window, warm-up and compilation, excluded);
- the device's dense-matmul rate: square fp32 and bf16 matrix products (2048 on a CPU, 8192 on
  a GPU), timed before and after training; the higher of the two medians counts.

MFU is the first over the second, in the run's precision; on a GPU that `VENDOR_PEAK_BF16`
knows, also against the vendor's dense bf16 peak.

    python benchmarks/mfu.py --flavor small --device cpu --precision fp32
    python benchmarks/mfu.py --flavor 1.3b --device cuda --precision bf16 \
        --strategy deepspeed --zero-stage 2 --steps 10 --accum 4

`--accum N` accumulates N micro-batches of the flavor's shape per optimizer step
(`trainer.grad_accum_steps`, the data batch N times larger), as MFU reports usually do: the
optimizer step (and DeepSpeed ZeRO's per-step gradient and master-weight copies) is then paid
once per N micro-batches. Every micro-batch's tokens count (the loop's `train/samples_per_s`
counts the whole step). `--ds-config JSON` merges raw ds_config keys (`strategy.config`), e.g.
`'{"zero_optimization": {"overlap_comm": true}}'`.

Prints `RESULT mfu_gpt_<flavor>_<precision> ours=<model FLOP/s> baseline=<matmul FLOP/s>
ratio=<MFU> unit=FLOP/s`, and on a known GPU `RESULT mfu_gpt_<flavor>_<precision>_vs_peak`.
The helpers (`train_rate`, `matmul_rate`) also serve `benchmarks/compile.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from roundhouse import models
from roundhouse.config.loading import validate_job
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run

logger = logging.getLogger("mfu")

# (sequence length, batch size) per flavor: CPU-sized for tiny/small, GPU-sized above.
SHAPES = {
    "debug": (64, 8),
    "tiny": (128, 32),
    "small": (256, 8),
    "124m": (1024, 32),
    "350m": (1024, 16),
    "1.3b": (2048, 8),
}
# Vendor dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched on the device name.
VENDOR_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}
VOCAB = 260  # roundhouse's byte vocabulary (builtin:pytext)


def make_job(storage: str, args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """A `--local` style job for gpt:<flavor> on builtin:pytext (no eval, no checkpoints)."""
    seq_len, batch = SHAPES[args.flavor]
    seq_len, batch = args.seq_len or seq_len, (args.batch or batch) * args.accum
    tokens = (args.steps + 4) * batch * (seq_len + 1)
    options = {k: yaml.safe_load(v) for k, v in args.options}
    strategy: dict[str, Any] = {"kind": args.strategy}
    if args.strategy == "deepspeed":
        strategy["zero_stage"] = args.zero_stage
        strategy["config"] = json.loads(args.ds_config)
    job = {
        "name": "mfu",
        "model": {"name": "gpt", "flavor": args.flavor, "options": options},
        "data": {
            "source": "builtin:pytext",
            "options": {"seq_len": seq_len, "max_bytes": max(2_000_000, int(tokens * 1.3))},
            "batch_size": batch,
            "eval_batch_size": batch,
            "split": [0.98, 0.01, 0.01],
        },
        "trainer": {
            "max_steps": args.steps,
            "grad_accum_steps": args.accum,
            "log_every_steps": args.window,
            "device": args.device,
            "precision": args.precision,
            "compile": args.compile,
            "deterministic": False,  # speed as trained, not bit-exact reruns
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            "optimizer": {"name": "adamw", "lr": 3e-4},
        },
        "strategy": strategy,
        "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
        "storage": {"path": storage},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        job[section][key] = value
    return job


def train_rate(args: argparse.Namespace, **overrides: Any) -> float:
    """Median training samples/s of one run of the job (first logged window excluded)."""
    with tempfile.TemporaryDirectory() as storage:
        job = validate_job(make_job(storage, args, **overrides))
        prepared = prepare_run(job)
        run_worker(prepared.job, build_local_context(job.trainer.device))
        path = Path(prepared.run_dir.url) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.open()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
    if len(rates) < 2:
        raise SystemExit(f"need at least 2 logged windows, got {len(rates)}: raise --steps")
    return statistics.median(rates[1:])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, reps: int = 5) -> float:
    """Median FLOP/s of an `n x n @ n x n` product (n = 2048 on CPU, 8192 on GPU)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def vendor_peak(device: torch.device) -> tuple[str, float] | None:
    """(device name, dense bf16 peak FLOP/s) for a GPU in `VENDOR_PEAK_BF16`, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in VENDOR_PEAK_BF16.items():
        if key in name:
            return name, peak
    return None


def model_flops_per_sample(args: argparse.Namespace) -> float:
    """Training FLOPs of one sample: 3 x the model's forward `flops_per_sample`."""
    seq_len = args.seq_len or SHAPES[args.flavor][0]
    config = models.BuildConfig(
        args.flavor,
        input_shape=(seq_len,),
        num_classes=VOCAB,
        options={k: yaml.safe_load(v) for k, v in args.options},
    )
    return 3.0 * models.get("gpt").flops_per_sample(config)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The job flags shared by the GPT benchmarks."""
    parser.add_argument("--flavor", default="small", choices=list(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--strategy", default="single", choices=["single", "deepspeed"])
    parser.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--window", type=int, default=5, help="steps per logged window")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="samples per micro-batch")
    parser.add_argument(
        "--accum", type=int, default=1, help="micro-batches per optimizer step (grad_accum_steps)"
    )
    parser.add_argument(
        "--ds-config", default="{}", help="raw ds_config keys as JSON (strategy.config)"
    )
    parser.add_argument("--compile", action="store_true", help="trainer.compile=true")
    parser.add_argument(
        "--option",
        dest="options",
        nargs=2,
        action="append",
        default=[],
        metavar=("K", "V"),
        help="a gpt model option, e.g. --option positions learned",
    )


def result(name: str, ours: float, baseline: float, unit: str) -> str:
    """One `RESULT` line in the benchmarks' format."""
    ratio = ours / baseline
    return f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.3f} unit={unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--rounds", type=int, default=1, help="training runs (median)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    before = {
        p: matmul_rate(device, t) for p, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    rates = [train_rate(args) for _ in range(args.rounds)]
    after = matmul_rate(device, dtype)
    measured = max(before[args.precision], after)
    samples = statistics.median(rates)
    achieved = samples * model_flops_per_sample(args)
    seq_len = args.seq_len or SHAPES[args.flavor][0]
    micro = args.batch or SHAPES[args.flavor][1]
    print(
        f"gpt:{args.flavor} {args.device} {args.precision} {args.strategy} "
        f"{args.accum} x {micro} x {seq_len}{' compiled' if args.compile else ''}: "
        f"{samples * seq_len:.1f} tokens/s, {achieved / 1e12:.3f} TFLOP/s; matmul "
        f"fp32 {before['fp32'] / 1e12:.3f}, bf16 {before['bf16'] / 1e12:.3f}, "
        f"after training ({args.precision}) {after / 1e12:.3f} TFLOP/s",
        flush=True,
    )
    name = f"mfu_gpt_{args.flavor}_{args.precision}"
    print(result(name, achieved, measured, "FLOP/s"))
    peak = vendor_peak(device)
    if peak is not None and args.precision == "bf16":
        print(f"{peak[0]}: vendor dense bf16 peak {peak[1] / 1e12:.0f} TFLOP/s")
        print(result(f"{name}_vs_peak", achieved, peak[1], "FLOP/s"))


if __name__ == "__main__":
    main()
