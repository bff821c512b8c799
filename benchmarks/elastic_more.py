"""The rest of issue 34's figures (`benchmarks/elastic.py --exact / --async-ckpt / --preempt`).

- exact: `strategy.exact: true` through a 3 -> 2 -> 3 trajectory (a SIGKILL and a replacement,
  the process-level live group of `tests/distributed/test_live_recovery.py`) against an
  uninterrupted 1-process run: how many weight tensors differ (0 is bit-identical); and the
  exact ring's median step time against the default ring's, both uninterrupted on 3 ranks.
- async checkpoint: gpt:small (`--local`, by default at the gpt configs' batch of 32 x 128
  tokens; `--batch`, `--seq-len`) with an async checkpoint every 10 steps against the same
  run with no checkpoint: throughput ratio (steps/s after the first step, the gaps that hold
  an evaluation left out: small data has an epoch end every ~14 steps; `within`: the mean
  step without a save over the mean step, in the checkpointed runs alone), and in the
  same run the loop's median block per save (`Trainer.save_checkpoint`, timed around the call)
  over the median step time. The two runs alternate, `rounds` times; medians.
- preemption: `count` times, `roundhouse train --local` on a slow MLP gets SIGTERM at a
  random moment after a random step (mid-step: the step takes ~0.1 s, its forward most of it);
  a trial passes when the process exits 143 within `cluster.preempt_grace_s` with a complete
  checkpoint (manifest verified) newer than the step the signal came after, and
  `--resume latest` ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from roundhouse.config.loading import validate_job
from roundhouse.runs.rundir import RunDir
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.checkpoint import Checkpointer
from roundhouse.weights.run_folder import prepare_run
from tests.distributed import test_live_recovery as live
from tests.helpers.runs import final_weights, read_metrics

ROOT = Path(__file__).resolve().parents[1]


def differing_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    """How many tensors of two state dicts are not bit-identical."""
    return sum(not torch.equal(a[k], b[k]) for k in a)


def median_step_s(run: Path) -> float:
    """The median time between rank 0's committed steps (the ledger)."""
    times = ledger_t(run)
    return statistics.median(b - a for a, b in itertools.pairwise(times))


def ledger_t(run: Path) -> list[float]:
    """Commit times of rank 0's steps."""
    return [json.loads(x)["t"] for x in (run / "ledger/rank_0.jsonl").read_text().split()]


def exact_job(storage: Path, at_call: int, exact: bool, epochs: int = 2) -> dict:
    """The live tests' MLP job (2 epochs of 12 steps), exact mode or the default ring."""
    job = live.make_job(storage, at_call=at_call)
    job["trainer"]["max_epochs"] = epochs
    job["model"]["options"].update(delay_s=0.05, marker=str(storage / "killed"))
    if exact:
        job["strategy"].update(exact=True, virtual_shards=6)
    return job


def exact_figures(tmp: Path) -> tuple[int, int, float, float]:
    """(bit-identical tensors after 3 -> 2 -> 3 vs 1 process, all tensors, exact step s,
    default step s)."""
    one = prepare_run(validate_job(exact_job(tmp / "one", 0, True)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the members: other thread counts add in other orders
    try:
        run_worker(one.job, build_local_context("cpu"))
    finally:
        torch.set_num_threads(threads)
    run, _ = live.train(exact_job(tmp / "j", 5, True), {2}, replace=True)
    reference = final_weights(Path(one.run_dir.url))
    differ = differing_tensors(reference, final_weights(run))
    step = {}
    for exact in (True, False):
        job = exact_job(tmp / f"steps_{exact}", 0, exact, epochs=3)
        job["model"]["options"]["delay_s"] = 0.0
        step[exact] = median_step_s(live.train(job, set())[0])
    return len(reference) - differ, len(reference), step[True], step[False]


GPT_BATCH = (32, 128)  # the gpt configs' batch: configs/gpt_pytext.yaml, gpt_deepspeed.yaml


def gpt_job(
    folder: Path, name: str, every: int | None, steps: int, batch: tuple[int, int] = GPT_BATCH
) -> dict:
    """gpt:small on builtin:pytext, `--local`, a checkpoint every `every` steps (or none);
    `batch`: (sequences, tokens per sequence)."""
    checkpoint = {"every_epoch": False, "keep_last": 2}
    if every:
        checkpoint.update(every_steps=every, **{"async": True})
    return {
        "name": name,
        "model": {"name": "gpt", "flavor": "small"},
        "data": {
            "source": "builtin:pytext",
            "options": {"seq_len": batch[1], "max_bytes": 200_000},  # a short evaluation
            "batch_size": batch[0],
        },
        "trainer": {
            "max_steps": steps,
            "max_epochs": None,
            "log_every_steps": 1,
            "device": "cpu",
            "optimizer": {"name": "adamw", "lr": 0.001},
            "checkpoint": checkpoint,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(folder)},
    }


def timed_gpt_run(
    folder: Path, name: str, every: int | None, steps: int, batch: tuple[int, int] = GPT_BATCH
) -> dict:
    """One `--local` gpt:small run: steps/s, median step s, the loop's block per save."""
    from roundhouse.trainer import loop

    blocks: list[float] = []
    original = loop.Trainer.save_checkpoint

    def timed(self: loop.Trainer) -> None:
        started = time.perf_counter()
        original(self)
        blocks.append(time.perf_counter() - started)

    loop.Trainer.save_checkpoint = timed  # type: ignore[method-assign]
    try:
        prepared = prepare_run(validate_job(gpt_job(folder, name, every, steps, batch)))
        run_worker(prepared.job, build_local_context("cpu"))
    finally:
        loop.Trainer.save_checkpoint = original  # type: ignore[method-assign]
    gaps = training_gaps(read_metrics(Path(prepared.run_dir.url)))
    periodic = blocks[:-1] if every else []  # the last save is the run's end, not a step's
    return {
        "rate": len(gaps) / sum(gaps.values()),
        "within": within_run_ratio(gaps, every) if every else 1.0,
        "step_s": statistics.median(gaps.values()),
        "block_s": statistics.median(periodic) if periodic else 0.0,
    }


def training_gaps(rows: list[dict]) -> dict[int, float]:
    """Seconds from each logged training step to the next (keyed by the earlier step),
    leaving out the gaps that hold an evaluation (the epoch ends of both runs; a save's block
    stays in the gap after its step)."""
    gaps, last = {}, None
    for row in rows:
        if "train/loss" not in row:
            last = None  # an evaluation row: the next gap is not a training step's
            continue
        if last is not None:
            gaps[last[0]] = row["time"] - last[1]
        last = (row["step"], row["time"])
    return gaps


def within_run_ratio(gaps: dict[int, float], every: int) -> float:
    """A checkpointed run's throughput over the same run's without its saves: the mean step
    without a save over the mean of all steps (robust to load that moves between runs)."""
    plain = [g for step, g in gaps.items() if step % every]
    return statistics.mean(plain) / statistics.mean(gaps.values())


def async_figures(
    tmp: Path, rounds: int = 2, steps: int = 31, batch: tuple[int, int] = GPT_BATCH
) -> tuple[float, float, float]:
    """(throughput ratio, the same within the checkpointed runs, median block per save,
    median step s of the checkpointed runs)."""
    with_ckpt, without = [], []
    for rnd in range(rounds):
        without.append(timed_gpt_run(tmp / f"none{rnd}", "none", None, steps, batch))
        with_ckpt.append(timed_gpt_run(tmp / f"async{rnd}", "async", 10, steps, batch))
    pairs = zip(with_ckpt, without, strict=True)
    ratio = statistics.median(w["rate"] / n["rate"] for w, n in pairs)
    block = statistics.median(r["block_s"] for r in with_ckpt)
    step = statistics.median(r["step_s"] for r in with_ckpt)
    within = statistics.median(r["within"] for r in with_ckpt)
    return ratio, within, block, step


def preempt_job(folder: Path, steps: int = 30) -> Path:
    """A slow MLP (`--local`, ~0.1 s a step), no periodic checkpoint; its job file."""
    job = {
        "name": "preempt",
        "model": {
            "name": "tests.helpers.models:slow_mlp",
            "flavor": "default",
            "options": {"delay_s": 0.1},
        },
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": steps,
            "max_epochs": None,
            "log_every_steps": 1,
            "device": "cpu",
            "optimizer": {"name": "sgd", "lr": 0.05},
            "checkpoint": {"every_epoch": False},
        },
        "cluster": {"preempt_grace_s": 30},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(folder / "runs")},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "preempt.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def cli(*args: str, **popen: object) -> subprocess.Popen:
    """`roundhouse ARGS` in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "roundhouse.launch.cli", *args]
    popen.setdefault("stdout", subprocess.DEVNULL)  # the final metrics table
    return subprocess.Popen(command, env=env, **popen)  # type: ignore[call-overload]


def last_step(run_root: Path) -> int:
    """The last step logged in the (single) run under `run_root`, or -1."""
    for metrics in run_root.glob("*/metrics.jsonl"):
        try:
            return max((r["step"] for r in read_metrics(metrics.parent)), default=-1)
        except ValueError:  # a line being written
            return -1
    return -1


def preempt_trial(folder: Path, rng: random.Random, reference: dict, grace_s: float) -> str:
    """One SIGTERM trial; '' when it passed, else why not."""
    job = preempt_job(folder)
    root = folder / "runs" / "preempt"
    with cli("train", str(job), "--local", stderr=subprocess.PIPE, text=True) as proc:
        after = rng.randint(2, 25)
        while last_step(root) < after:
            if proc.poll() is not None:
                return f"ended before step {after}"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.1))  # somewhere inside a step
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=grace_s + 30)
        took = time.monotonic() - signalled
    run = next(root.iterdir())
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    Checkpointer(RunDir(str(run)), keep_last=2, identity={}).verify(step)
    if proc.returncode != 143 or took > grace_s or step < after:
        return f"exit {proc.returncode} after {took:.1f} s at step {step} (after {after}): {err}"
    resume = ("train", str(job), "--local", "--resume", "latest")
    with cli(*resume, stderr=subprocess.PIPE, text=True) as resumed:
        _, err = resumed.communicate(timeout=300)
    if resumed.returncode != 0:
        return f"resume failed: {err[-300:]}"
    differ = differing_tensors(reference, final_weights(run))
    return f"{differ} tensors differ after the resume" if differ else ""


def preempt_figures(tmp: Path, count: int = 20, grace_s: float = 30.0) -> tuple[int, list[str]]:
    """(passed trials, the failures' reasons)."""
    whole = cli("train", str(preempt_job(tmp / "whole")), "--local")
    assert whole.wait(timeout=600) == 0, "the uninterrupted run failed"
    reference = final_weights(next((tmp / "whole/runs/preempt").iterdir()))
    rng = random.Random(0)
    failures = []
    for trial in range(count):
        why = preempt_trial(tmp / f"t{trial}", rng, reference, grace_s)
        if why:
            failures.append(f"trial {trial}: {why}")
    return count - len(failures), failures
