"""Live recovery and async checkpoints, measured (the quick, process-level part of issue 34).

(a) stall: 3 ring ranks on one TCPStore (the process-level live group of
    `tests/distributed/test_live_recovery.py`); rank 2 SIGKILLs itself mid-step. Ours: the
    time from the kill (written by the dying rank just before) to the survivors' next
    committed step (the ledger's timestamps), under `recovery: live`. Baseline: the restart
    path's floor without Ray Train's group setup: 2 fresh processes spawned at the kill that
    resume from the latest checkpoint, to their first committed step. Ray Train's own group
    setup (20-25 s on this machine) would come on top of the baseline.
(b) goodput: the time uninterrupted runs at the same number of live workers (3 ranks, then
    2) would take for the live run's committed steps, over the time the live run took (kill
    and recovery included). A run of 60 steps of ~0.45 s (a sleep in the model's forward
    stands for a heavier step) with one kill: one failure per ~30 s of training, as in the
    issue's trace. On the stall run's 30 ms steps the same single kill would weigh ten times
    more than one failure per 30 s does.
(a', b') the same under `strategy.kind: ps` (sync; the shards in a manager process).
(c) async_checkpoint_block: how long the loop waits in one save of a gpt-sized state (~50 MB):
    `trainer.checkpoint.async` (the CPU snapshot, into the last snapshot's buffers) against a
    synchronous save; one saver each for 5 saves, as in the loop.

`--trace` runs the full issue-34 trace instead (`benchmarks/elastic_trace.py`: a multi-node
Ray cluster, a SIGKILL of a random worker every 30 s for `--minutes`, its node back 20 s
later, `recovery: restart` and `recovery: live` alternated for `--rounds`).

    python benchmarks/elastic.py --quick
    python benchmarks/elastic.py --trace --minutes 5 [--model gpt_small] [--modes live]
    python benchmarks/elastic.py --async-ckpt [--batch 32 --seq-len 128]  # gpt:small

Prints `RESULT <name> ours=... baseline=... ratio=... unit=...` lines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from roundhouse.runs.rundir import RunDir  # noqa: E402
from roundhouse.trainer.async_checkpoint import AsyncSaver, SyncSaver  # noqa: E402
from roundhouse.weights.checkpoint import Checkpointer  # noqa: E402
from tests.distributed import test_live_recovery as live  # noqa: E402


def result(name: str, ours: float, baseline: float, unit: str) -> str:
    """One RESULT line."""
    ratio = ours / baseline
    return f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.3f} unit={unit}"


def ledger_times(run: Path, rank: int = 0) -> list[tuple[int, float, int]]:
    """(global step, time, world size) of each committed step of `rank`."""
    lines = (run / "ledger" / f"rank_{rank}.jsonl").read_text().split()
    return [(r["gs"], r["t"], r["w"]) for r in map(json.loads, lines)]


SHORT = (0.02, 2)  # (seconds of sleep per forward, epochs): the stall run, steps of ~30 ms
# The goodput run: ~0.45 s steps, 60 of them; one kill in ~27 s of training stands for the
# issue's trace (a kill every 30 s) in one short run.
LONG = (0.4, 5)


def job(
    storage: Path, at_call: int, shape: tuple[float, int], strategy: dict | None = None
) -> dict:
    spec = live.make_job(storage, at_call=at_call)
    if strategy is not None:
        spec["strategy"] = strategy
    spec["trainer"]["max_epochs"] = shape[1]
    spec["model"]["options"].update(delay_s=shape[0], marker=str(storage / "killed"))
    return spec


def step_rate(storage: Path, world: int, shape: tuple[float, int], strategy: dict | None) -> float:
    """Committed steps/s of an uninterrupted run on `world` ranks (the failure-free rate)."""
    spec = job(storage, at_call=0, shape=shape, strategy=strategy)
    live.WORLD, saved = world, live.WORLD
    try:
        run, _ = live.train(spec, set())
    finally:
        live.WORLD = saved
    times = ledger_times(run)
    return (len(times) - 1) / (times[-1][1] - times[0][1])


def killed_run(tmp: Path, name: str, shape: tuple[float, int], strategy: dict | None) -> tuple:
    """A live run on 3 ranks whose rank 2 dies at its 8th training forward: (the ledger's
    commit times, the kill's time)."""
    run, _ = live.train(job(tmp / name, at_call=8, shape=shape, strategy=strategy), {2})
    return ledger_times(run), (tmp / name / "killed").stat().st_mtime


def live_stall(tmp: Path, strategy: dict | None = None) -> float:
    """Seconds from the kill to the survivors' next committed step (the redone step's time
    included), on the short run."""
    name = "stall" if strategy is None else f"stall_{strategy['kind']}"
    times, killed_at = killed_run(tmp, name, SHORT, strategy)
    return min(t for _, t, w in times if w == 2) - killed_at


def live_goodput(tmp: Path, strategy: dict | None = None) -> float:
    """The time an uninterrupted run at the same number of live workers would take for the
    steps committed at each world size (3, then 2), over the time the live run took, kill and
    recovery included (the long run)."""
    name = "goodput" if strategy is None else f"goodput_{strategy['kind']}"
    times, _ = killed_run(tmp, name, LONG, strategy)
    rates = {w: step_rate(tmp / f"{name}_ref{w}", w, LONG, strategy) for w in (3, 2)}
    steps = [w for _, _, w in times[1:]]  # each step after the first, at its world size
    expected = sum(1.0 / rates[w] for w in steps)
    took = times[-1][1] - times[0][1]
    print(
        f"{name}: {len(steps)} steps in {took:.2f} s (uninterrupted at the same worlds: "
        f"{expected:.2f} s; steps/s at 3 and 2 ranks: {rates[3]:.3f}, {rates[2]:.3f})",
        flush=True,
    )
    return expected / took


def restart_floor(tmp: Path) -> float:
    """Seconds from spawning 2 fresh ranks that resume a checkpoint to their first step."""
    spec = job(tmp / "restart", at_call=0, shape=(SHORT[0], 1))
    spec["trainer"]["checkpoint"] = {"every_steps": 4, "every_epoch": False}
    spec["trainer"]["max_epochs"], spec["trainer"]["max_steps"] = None, 4
    run, _ = live.train(spec, set())
    spec["trainer"]["max_steps"] = 8
    spec["storage"]["run_id"] = run.name
    spec["cluster"]["recovery"] = "restart"
    started = time.time()
    from tests.distributed.test_ring_training import train as ring_train

    live_ranks = 2
    ring_train(spec, live_ranks, resume=True)
    first = min(t for gs, t, _ in ledger_times(run) if gs == 5)
    return first - started


def checkpoint_block(tmp: Path, rounds: int = 5) -> tuple[float, float]:
    """Median seconds the loop waits per save: async (snapshot) and synchronous.

    One saver per kind for the whole run, as in the loop; between saves the previous commit
    is awaited outside the timed part (the steps between two saves outlast a commit).
    """
    state = {"model": {f"w{i}": torch.randn(1024, 1024) for i in range(12)}}  # ~50 MB
    waits: dict[str, list[float]] = {"async": [], "sync": []}
    savers = {
        name: cls(Checkpointer(RunDir(str(tmp / f"ckpt_{name}")), keep_last=2, identity={}))
        for name, cls in (("async", AsyncSaver), ("sync", SyncSaver))
    }
    for i in range(rounds):
        for name, saver in savers.items():
            started = time.perf_counter()
            saver.save(i, state, {})
            waits[name].append(time.perf_counter() - started)
            saver.wait()
    for saver in savers.values():
        saver.close()
    return statistics.median(waits["async"]), statistics.median(waits["sync"])


def more(args: argparse.Namespace) -> None:
    """The figures of `elastic_more` asked for on the command line."""
    import elastic_more as em

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.exact:
            same, total, exact_s, ring_s = em.exact_figures(tmp / "exact")
            print(result("exact_bit_identical_tensors_vs_1_process", same, total, "tensors"))
            print(result("exact_step_time", exact_s, ring_s, "s"), flush=True)
        if args.async_ckpt:
            batch = (args.batch, args.seq_len)
            ratio, within, block_s, step_s = em.async_figures(
                tmp / "async", args.ckpt_rounds, args.ckpt_steps, batch
            )
            print(result("async_ckpt_throughput", ratio, 1.0, "ratio"))
            print(result("async_ckpt_throughput_within_run", within, 1.0, "ratio"))
            print(result("async_ckpt_block_per_save", block_s, step_s, "s"), flush=True)
        if args.preempt:
            passed, failures = em.preempt_figures(tmp / "preempt", args.preempt)
            for failure in failures:
                print(failure, flush=True)
            print(result("preempt_complete_and_bit_identical", passed, args.preempt, "trials"))


def main() -> None:
    """Run the quick figures and print the RESULT lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick mode (the default)")
    parser.add_argument("--trace", action="store_true", help="the multi-node failure trace")
    parser.add_argument("--minutes", type=float, default=5.0, help="the trace's length")
    parser.add_argument("--rounds", type=int, default=1, help="restart/live trace rounds")
    parser.add_argument("--modes", default="restart,live", help="the trace's recovery modes")
    parser.add_argument(
        "--model", default="cnn", choices=("cnn", "gpt_small"), help="the trace's job"
    )
    parser.add_argument("--exact", action="store_true", help="exact mode: 3 -> 2 -> 3 workers")
    parser.add_argument("--async-ckpt", action="store_true", help="async checkpoints, gpt:small")
    parser.add_argument("--batch", type=int, default=32, help="--async-ckpt: sequences a step")
    parser.add_argument("--seq-len", type=int, default=128, help="--async-ckpt: tokens a sequence")
    parser.add_argument("--ckpt-steps", type=int, default=31, help="--async-ckpt: steps a run")
    parser.add_argument("--ckpt-rounds", type=int, default=2, help="--async-ckpt: run pairs")
    parser.add_argument("--preempt", type=int, default=0, help="this many SIGTERM trials")
    args = parser.parse_args()
    if args.exact or args.async_ckpt or args.preempt:
        more(args)
        return
    if args.trace:
        from elastic_trace import run_trace

        modes = tuple(args.modes.split(","))
        for line in run_trace(args.minutes, args.rounds, modes, args.model):
            print(line, flush=True)
        return
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        ps = {"kind": "ps", "mode": "sync", "num_servers": 2}
        stall, stall_ps = live_stall(tmp), live_stall(tmp, ps)
        goodput, goodput_ps = live_goodput(tmp), live_goodput(tmp, ps)
        floor = restart_floor(tmp)
        print(result("survivor_stall", stall, floor, "s"))
        print(result("live_goodput", goodput, 1.0, "ratio"))
        print(result("survivor_stall_ps", stall_ps, floor, "s"))
        print(result("live_goodput_ps", goodput_ps, 1.0, "ratio"))
        block_async, block_sync = checkpoint_block(tmp)
        print(result("async_checkpoint_block", block_async, block_sync, "s"))


if __name__ == "__main__":
    main()
