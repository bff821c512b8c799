"""Per-rank memory of DeepSpeed ZeRO stages 0-3 against the ZeRO paper's model, and their speed.

For each world size N, gloo processes on 127.0.0.1 train the same job through the real
`run_worker` (an MLP of ~4.2M parameters on synthetic 3x32x32 inputs, Adam, fp32 on CPU) with
`strategy.kind=deepspeed` and `zero_stage` 0-3, and once with `ring`. Inside the second optimizer
step (Adam's state exists since the first), just before the torch optimizer updates, each rank
sums the bytes of the engine's actual tensors, each storage counted once, and the fullest rank
is reported (ranks differ by padding and by which parameters' gradients they keep):

- params: the model's parameters (for ZeRO-3 their partitions `ds_tensor`) plus the fp32 flat
  master partitions the optimizer updates (for stage 0 these are the parameters themselves);
- grads: the parameters' `.grad` plus the gradients of those flat partitions;
- optim: the optimizer's state tensors (Adam's `exp_avg`, `exp_avg_sq`).

DeepSpeed's communication buckets (reduce/all-gather buckets, ZeRO-2's contiguous-gradient
buffer) are not counted. The baseline is the ZeRO paper's model (Rajbhandari et al. 2020,
Sec. 5) for Adam in its fp32 form, with no fp16 copy: 4 bytes of parameters, 4 of gradients
and K = 8 of Adam moments per parameter, Psi parameters, N data-parallel ranks:

    stage 0:  4 Psi      + 4 Psi      + 8 Psi       = 16 Psi
    stage 1:  4 Psi      + 4 Psi      + 8 Psi / N
    stage 2:  4 Psi      + 4 Psi / N  + 8 Psi / N
    stage 3:  4 Psi / N  + 4 Psi / N  + 8 Psi / N   = 16 Psi / N

Speed: steps/s of each stage against `ring` on the same job and world size (median of the
`train/samples_per_s` windows the loop logs, the first excluded, divided by the batch).

    python benchmarks/zero_memory.py [--worlds 2 4] [--steps 24]

Prints `RESULT zero<s>_w<N>_<params|grads|optim|total> ours=<measured MB> baseline=<model MB>
ratio=... unit=MB` and `RESULT zero<s>_w<N>_speed ours=<steps/s> baseline=<ring steps/s>
ratio=... unit=steps/s`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from roundhouse.parallel.net import free_port

logger = logging.getLogger("zero_memory")
BATCH = 64
WINDOW = 4
HIDDEN = [1024, 1024]
MB = 2**20


def make_job(storage: str, steps: int, strategy: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "zero_memory",
        "model": {"name": "mlp", "flavor": "debug", "options": {"hidden_sizes": HIDDEN}},
        "data": {
            "source": "builtin:synthetic",
            "batch_size": BATCH,
            "eval_batch_size": 256,
            "split": [0.9, 0.05, 0.05],
            "options": {"shape": [3, 32, 32], "num_samples": 2048},
        },
        "trainer": {
            "max_steps": steps,
            "log_every_steps": WINDOW,
            "device": "cpu",
            "checkpoint": {"every_epoch": False, "keep_last": 1},
            "optimizer": {"name": "adam", "lr": 0.001},
        },
        "strategy": strategy,
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": storage, "run_id": "bench"},
    }


def model_bytes(stage: int, psi: int, world: int) -> dict[str, float]:
    """The ZeRO paper's per-rank bytes for fp32 Adam (see the module docstring)."""
    params = 4 * psi / world if stage == 3 else 4 * psi
    grads = 4 * psi / world if stage >= 2 else 4 * psi
    optim = 8 * psi / world if stage >= 1 else 8 * psi
    return {"params": params, "grads": grads, "optim": optim, "total": params + grads + optim}


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(engine: Any, base: torch.optim.Optimizer, stage: int) -> dict[str, float]:
    """The rank's parameter, gradient and optimizer-state bytes (see the module docstring)."""
    module = list(engine.module.parameters())
    flats = [p for group in base.param_groups for p in group["params"]]
    local = [p.ds_tensor if stage == 3 else p for p in module]
    states = [v for p in flats for v in base.state.get(p, {}).values() if torch.is_tensor(v)]
    params = storage_bytes(local + flats)
    grads = storage_bytes([p.grad for p in module] + [p.grad for p in flats])
    optim = storage_bytes([v for v in states if v.dim() > 0])
    return {"params": params, "grads": grads, "optim": optim, "total": params + grads + optim}


def instrument(found: dict[str, Any]) -> None:
    """Make the DeepSpeed strategy record `measure` inside its second optimizer step."""
    from roundhouse.parallel.deepspeed.strategy import DeepSpeedStrategy

    setup = DeepSpeedStrategy.setup

    def patched_setup(self: DeepSpeedStrategy, model: Any, plan: Any) -> None:
        setup(self, model, plan)
        base, step = self.zero.base, self.zero.base.step
        calls = [0]

        def recording_step(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                found["bytes"] = measure(self.engine, base, self.config.zero_stage)
                found["psi"] = sum(
                    p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                    for p in self.engine.module.parameters()
                )
            return step(*args, **kwargs)

        base.step = recording_step

    DeepSpeedStrategy.setup = patched_setup  # type: ignore[method-assign]


def worker(rank: int, world: int, port: int, job: dict, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")  # e.g. the scheduler's note on the wrapped step()
    from roundhouse.config.loading import validate_job
    from roundhouse.trainer import WorkerContext, run_worker

    dist.init_process_group("gloo", rank=rank, world_size=world)
    found: dict[str, Any] = {}
    instrument(found)
    ctx = WorkerContext(
        rank=rank,
        world_size=world,
        local_rank=rank,
        local_world_size=world,
        node_rank=0,
        num_nodes=1,
        device=torch.device("cpu"),
    )
    run_worker(validate_job(job), ctx)
    results.put((rank, found))
    dist.destroy_process_group()


def run(world: int, steps: int, strategy: dict[str, Any]) -> tuple[float, list[dict]]:
    """Steps/s of one job on `world` processes, and what every rank measured."""
    from roundhouse.config.loading import validate_job
    from roundhouse.weights.run_folder import prepare_run

    with tempfile.TemporaryDirectory() as storage:
        prepared = prepare_run(validate_job(make_job(storage, steps, strategy)))
        job = prepared.job.model_dump(mode="json")
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        mp.start_processes(
            worker, args=(world, free_port(), job, results), nprocs=world, start_method="spawn"
        )
        found = dict(results.get() for _ in range(world))
        rows = [json.loads(x) for x in (Path(prepared.run_dir.url) / "metrics.jsonl").open()]
    rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r][1:]
    return statistics.median(rates) / BATCH, [found[r] for r in range(world)]


def report(world: int, stage: int, ranks: list[dict], rate: float, ring: float) -> list[str]:
    """RESULT lines of one (world, stage); memory is the fullest rank's (what must fit)."""
    fullest = max(ranks, key=lambda r: r["bytes"]["total"])
    measured, psi = fullest["bytes"], fullest["psi"]
    expected = model_bytes(stage, psi, world)
    spread = measured["total"] - min(r["bytes"]["total"] for r in ranks)
    logger.info("zero%d w%d: psi=%d, ranks differ by up to %d bytes", stage, world, psi, spread)
    lines = [
        f"RESULT zero{stage}_w{world}_{key} ours={measured[key] / MB:.2f} "
        f"baseline={expected[key] / MB:.2f} ratio={measured[key] / expected[key]:.3f} unit=MB"
        for key in ("params", "grads", "optim", "total")
    ]
    lines.append(
        f"RESULT zero{stage}_w{world}_speed ours={rate:.2f} baseline={ring:.2f} "
        f"ratio={rate / ring:.3f} unit=steps/s"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    lines: list[str] = []
    for world in args.worlds:
        ring, _ = run(world, args.steps, {"kind": "ring"})
        logger.info("ring w%d: %.2f steps/s", world, ring)
        for stage in args.stages:
            rate, ranks = run(world, args.steps, {"kind": "deepspeed", "zero_stage": stage})
            lines += report(world, stage, ranks, rate, ring)
            logger.info("\n".join(lines[-5:]))
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
