"""The issue-34 failure trace on a local multi-node Ray cluster (`benchmarks/elastic.py --trace`).

One `ray.cluster_utils.Cluster`: a head without CPUs (the driver, Ray Train's controller) and
one 1-CPU node per worker (3), so each worker has a node of its own. The quickstart CNN
(`configs/quickstart.yaml`'s model and data), or with `--model gpt_small` gpt:small on 1 MB of
the standard library's source (`configs/gpt_pytext.yaml`, 32 x 128 bytes a step), trains on
the 3 workers (`trainer.ledger: true`, a checkpoint every `CKPT_EVERY` steps), sized to take
about `--minutes` failure-free.

The trace: from the first committed step on, every `KILL_EVERY_S` s for `--minutes` a
random worker process is SIGKILLed and its node removed (its raylet killed: the machine is
gone); `NODE_BACK_S` s later a fresh 1-CPU node joins. Ray then re-places the lost placement
group bundle on it: under `recovery: live` roundhouse's live group starts a replacement actor
there, which joins the survivors at a step boundary; under `recovery: restart` Ray Train tears
the group down and restarts it (from the latest checkpoint) once 3 workers fit again. After
the trace window the run finishes undisturbed, so its final model can be compared with an
uninterrupted run of the same job.

Figures (per mode; the modes alternate, restart first, in one run):
- stall: per kill, the kill's time to the next step any rank commits (the ledger's
  timestamps), the median over the kills;
- goodput: over the trace window, the time the failure-free run would need for the steps
  committed in it (each at the world size it ran at; steps later undone by a restart do not
  count) over the window's length. The failure-free step rates at 3, 2 and 1 workers come
  from uninterrupted live-group runs of the same job (the 3-worker one is also the reference
  for the final model);
- ledger: `roundhouse runs verify`'s duplicates and missing samples over all epochs;
- final model: test accuracy and the max abs weight difference against the reference run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from roundhouse.config.loading import load_job
from roundhouse.parallel.net import free_port
from roundhouse.runs.ledger import live_lines, read_ledger, verify_ledger
from roundhouse.runs.metrics_file import read_final_metrics
from roundhouse.runs.rundir import RunDir

logger = logging.getLogger("elastic_trace")

WORLD = 3
KILL_EVERY_S = 30.0
NODE_BACK_S = 20.0
CKPT_EVERY = 20  # steps: about 5 s of training on this machine
WORKER_NAMES = ("LiveWorker", "RayTrainWorker")  # the actor process titles to kill


@dataclass(frozen=True)
class TraceModel:
    """One of the trace's jobs: a job file, what changes in it, and how its length is set."""

    config: str  # the job file under configs/
    overrides: dict[str, Any]  # sections merged over the file's
    calibration_steps: int  # steps of the failure-free run that sizes the trace
    steps_per_epoch: int | None  # the run ends on whole epochs of this many steps; None: max_steps


MODELS = {
    # digits' training split (1438 samples) at the quickstart's global batch of 64
    "cnn": TraceModel("quickstart.yaml", {}, 46, 23),
    # gpt:small (~10M parameters) on 32 x 128 bytes of the standard library's source a step;
    # 1 MB of it keeps the final validation and test passes short (one epoch > the trace)
    "gpt_small": TraceModel(
        "gpt_pytext.yaml",
        {
            "model": {"name": "gpt", "flavor": "small"},
            "data": {
                "source": "builtin:pytext",
                "options": {"seq_len": 128, "max_bytes": 1_000_000},
                "batch_size": 32,
                "eval_batch_size": 64,
            },
            "strategy": {"kind": "ring"},
        },
        12,
        None,
    ),
}


def trace_job(
    storage: Path, name: str, recovery: str, steps: int, world: int = WORLD, model: str = "cnn"
) -> Any:
    """`model`'s job (`MODELS`) for about `steps` steps on `world` workers."""
    spec = MODELS[model]
    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / spec.config).read_text())
    raw.update(spec.overrides)
    raw["name"] = name
    raw["trainer"].update(
        ledger=True,
        log_every_steps=10,
        checkpoint={"every_steps": CKPT_EVERY, "every_epoch": False, "keep_last": 2},
    )
    if spec.steps_per_epoch is not None:  # whole epochs
        raw["trainer"].update(max_epochs=max(1, -(-steps // spec.steps_per_epoch)))
    else:
        raw["trainer"].update(max_steps=steps, max_epochs=None, eval_every_steps=None)
    raw["cluster"] = {
        "num_workers": world,
        "cpus_per_worker": 1,
        "placement": "spread",
        "recovery": recovery,
        "max_failures": 1000,
        "collective_timeout_s": 60,
        "schedule_timeout_s": 600,
    }
    raw["tracking"] = {"wandb": {"mode": "disabled"}, "console": "off"}
    raw["storage"] = {"path": str(storage), "run_id": "run"}
    path = storage / f"{name}.yaml"
    storage.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return load_job(str(path))


class TraceCluster:
    """The multi-node cluster: a 0-CPU head and one 1-CPU node per worker."""

    def __init__(self, world: int = WORLD) -> None:
        from ray._common.utils import get_default_ray_temp_dir
        from ray.cluster_utils import Cluster

        # `Cluster` writes its address into Ray's default temp folder, which a fresh machine lacks
        os.makedirs(get_default_ray_temp_dir(), exist_ok=True)

        self.temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short socket paths
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "node_ip_address": "127.0.0.1",
                "gcs_server_port": free_port(),
                "include_dashboard": False,
                "temp_dir": self.temp_dir,
            },
        )
        self.nodes = [self.add() for _ in range(world)]

    @property
    def address(self) -> str:
        """The head's address, for `train_with_ray(address=...)`."""
        return self.cluster.address

    def add(self) -> Any:
        """A fresh 1-CPU worker node."""
        return self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")

    def worker_pids(self, node: Any) -> list[int]:
        """The training worker processes on `node` (children of its raylet)."""
        raylet = node.all_processes["raylet"][0].process.pid
        try:
            children = psutil.Process(raylet).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        pids = []
        for child in children:
            try:
                title = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if any(name in title for name in WORKER_NAMES):
                pids.append(child.pid)
        return pids

    def kill_random_worker(self, rng: random.Random) -> float | None:
        """SIGKILL a random worker process and remove its node; the kill's time or None."""
        busy = [n for n in self.nodes if self.worker_pids(n)]
        if not busy:
            return None
        node = rng.choice(busy)
        killed_at = time.time()
        for pid in self.worker_pids(node):
            os.kill(pid, signal.SIGKILL)
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)
        return killed_at

    def shutdown(self) -> None:
        """Stop every node."""
        self.cluster.shutdown()


@dataclass
class Killer:
    """Kills a random worker every `KILL_EVERY_S` s for `window_s` after the first step."""

    cluster: TraceCluster
    run_dir: Path
    window_s: float
    seed: int = 0
    driver: Any = None  # the training process: the trace ends when it does
    kills: list[float] = field(default_factory=list)
    start: float | None = None

    def running(self) -> bool:
        """Whether the training process still runs."""
        return self.driver.poll() is None

    def run(self) -> None:
        """The thread body: wait for the first step, then kill and bring nodes back."""
        rng = random.Random(self.seed)
        while self.start is None and self.running():
            self.start = first_step_time(self.run_dir)
            time.sleep(0.5)
        if self.start is None:
            return
        returns: list[float] = []
        next_kill = self.start + KILL_EVERY_S
        while self.running():
            now = time.time()
            while returns and returns[0] <= now:
                returns.pop(0)
                self.cluster.nodes.append(self.cluster.add())
            if now >= next_kill and next_kill < self.start + self.window_s:
                killed = self.cluster.kill_random_worker(rng)
                if killed is not None:
                    self.kills.append(killed)
                    returns.append(killed + NODE_BACK_S)
                next_kill += KILL_EVERY_S
            if not returns and now >= self.start + self.window_s:
                return
            time.sleep(0.2)


def first_step_time(run_dir: Path) -> float | None:
    """The time of the first committed step in the run's ledger, or None yet."""
    times = [line["t"] for line in raw_lines(run_dir)]
    return min(times) if times else None


def raw_lines(run_dir: Path) -> list[dict]:
    """Every ledger line written so far (cut lines skipped)."""
    lines = []
    for path in sorted((run_dir / "ledger").glob("rank_*.jsonl")):
        for text in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line being written
                lines.append(json.loads(text))
    return lines


def run_job(job: Any, address: str, cluster: TraceCluster | None, window_s: float) -> dict:
    """Train `job` (`roundhouse train JOB --address`, a process of its own) on the cluster,
    under the trace when `cluster` is given; what happened.

    The trace runs in this process's main thread: Ray starts a node only from there.
    """
    storage = Path(job.storage.path)
    run = storage / job.name / job.storage.run_id
    path = storage / f"{job.name}.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    command = [sys.executable, "-m", "roundhouse.launch.cli", "train", str(path)]
    started = time.time()
    log = open(storage / f"{job.name}.log", "w")  # noqa: SIM115
    with subprocess.Popen([*command, "--address", address], stdout=log, stderr=log) as driver:
        if cluster is not None:
            killer = Killer(cluster, run, window_s, driver=driver)
            killer.run()
            while len(cluster.nodes) < WORLD:  # nodes still due back: back now
                cluster.nodes.append(cluster.add())
        else:
            killer = None
        code = driver.wait()
    log.close()
    if code != 0 and killer is None:
        tail = (storage / f"{job.name}.log").read_text().splitlines()[-5:]
        raise RuntimeError(f"{job.name} failed ({code}): {tail}")
    if code != 0:  # a traced run that failed: its figures up to the failure still count
        logger.warning("%s failed (exit %d); see %s.log", job.name, code, storage / job.name)
    metrics = read_final_metrics(RunDir(str(run))) if code == 0 else {}
    took = time.time() - started
    return {"run": run, "metrics": metrics, "took": took, "killer": killer, "ok": code == 0}


def committed_steps(run: Path) -> list[tuple[int, float, int]]:
    """(global step, commit time, world size) of each step in the final trajectory."""
    _, lines, resumes = read_ledger(RunDir(str(run)))
    kept, _ = live_lines(lines, resumes)
    by_step: dict[int, tuple[float, int]] = {}
    for line in kept:
        t, w = by_step.get(line["gs"], (0.0, 0))
        by_step[line["gs"]] = (max(t, line["t"]), max(w, line["w"]))
    return sorted((gs, t, w) for gs, (t, w) in by_step.items())


def step_rates(runs: dict[int, Path]) -> dict[int, float]:
    """Failure-free committed steps/s per world size (after the first step)."""
    rates = {}
    for world, run in runs.items():
        steps = committed_steps(run)
        rates[world] = (len(steps) - 1) / (steps[-1][1] - steps[0][1])
    return rates


def stall_per_kill(run: Path, kills: list[float]) -> list[float]:
    """Seconds from each kill to the next step any rank committed after it."""
    times = sorted(line["t"] for line in raw_lines(run))
    return [min((t for t in times if t > k), default=float("nan")) - k for k in kills]


def goodput(run: Path, start: float, window_s: float, rates: dict[int, float]) -> float:
    """Failure-free time of the steps committed in the window, over the window."""
    steps = [(t, w) for _, t, w in committed_steps(run) if start < t <= start + window_s]
    slowest = min(rates.values())
    needed = sum(1.0 / rates.get(w, slowest) for _, w in steps)
    return needed / window_s


def final_model(run: Path) -> dict[str, torch.Tensor]:
    """The model weights of the run's latest checkpoint."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run / "checkpoints" / latest / "state.pt", weights_only=True)
    return state["strategy"]["model"]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two state dicts' floating tensors."""
    return max(
        (a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point()
    )


def accuracy(metrics: dict) -> float:
    """The run's final test accuracy (val when the job has no test split)."""
    return float(metrics.get("test/accuracy", metrics.get("val/accuracy", float("nan"))))


def ledger_counts(run: Path) -> tuple[int, int, int]:
    """`runs verify`'s (duplicates, missing, epochs) over the run."""
    report = verify_ledger(RunDir(str(run)))
    dup = sum(e.duplicates for e in report.epochs)
    return dup, sum(e.missing for e in report.epochs), len(report.epochs)


def result(name: str, ours: float, baseline: float, unit: str) -> str:
    """One RESULT line."""
    ratio = ours / baseline if baseline else float("nan")
    return f"RESULT {name} ours={ours:.4g} baseline={baseline:.4g} ratio={ratio:.3f} unit={unit}"


def reference_runs(
    tmp: Path, address: str, steps: int, model: str
) -> tuple[dict[int, float], dict]:
    """Uninterrupted live-group runs: 1 and 2 workers (rates), 3 workers (rate + reference)."""
    runs = {}
    short = max(MODELS[model].calibration_steps, steps // 4)
    for world in (1, 2):
        job = trace_job(tmp / f"ref{world}", f"ref{world}", "live", short, world, model)
        runs[world] = run_job(job, address, None, 0.0)["run"]
    job = trace_job(tmp / "ref3", "ref3", "live", steps, WORLD, model)
    reference = run_job(job, address, None, 0.0)
    runs[WORLD] = reference["run"]
    return step_rates(runs), reference


def traced(
    tmp: Path, cluster: TraceCluster, mode: str, rnd: int, steps: int, window: float, model: str
) -> dict:
    """One mode's run under the trace, and its figures."""
    name = f"{mode}{rnd}"
    job = trace_job(tmp / name, name, mode, steps, WORLD, model)
    out = run_job(job, cluster.address, cluster, window)
    killer = out["killer"]
    (tmp / name / "kills.json").write_text(json.dumps(killer.kills))
    out["stalls"] = stall_per_kill(out["run"], killer.kills)
    out["start"] = killer.start
    logger.warning(
        "%s: %d kills, stalls %s s, run took %.0f s",
        name,
        len(killer.kills),
        [round(s, 2) for s in out["stalls"]],
        out["took"],
    )
    return out


def run_trace(
    minutes: float, rounds: int, modes: tuple[str, ...] = ("restart", "live"), model: str = "cnn"
) -> list[str]:
    """The whole trace of `model` (`MODELS`; see the module docstring); the RESULT lines."""
    window = 60.0 * minutes
    tmp = Path(tempfile.mkdtemp(prefix="rh-trace-"))  # kept: the runs' logs and ledgers
    logger.warning("trace runs in %s", tmp)
    cluster = TraceCluster()
    try:
        calib_job = trace_job(
            tmp / "calib", "calib", "live", MODELS[model].calibration_steps, WORLD, model
        )
        calib = run_job(calib_job, cluster.address, None, 0)
        rate = step_rates({WORLD: calib["run"]})[WORLD]
        steps = int(rate * window * 1.05)
        logger.warning("failure-free %.2f steps/s at 3 workers: %d steps", rate, steps)
        rates, ref = reference_runs(tmp, cluster.address, steps, model)
        logger.warning("failure-free steps/s by world size: %s", rates)
        figures: dict[str, list] = {mode: [] for mode in modes}
        for rnd in range(rounds):
            for mode in modes:
                out = traced(tmp, cluster, mode, rnd, steps, window, model)
                figures[mode].append(round_figures(out, window, rates, ref))
                logger.warning("%s round %d: %s", mode, rnd, figures[mode][-1])
    finally:
        cluster.shutdown()
    return trace_lines(figures, accuracy(ref["metrics"]))


def round_figures(out: dict, window: float, rates: dict[int, float], ref: dict) -> dict:
    """One traced run's figures."""
    dup, miss, epochs = ledger_counts(out["run"])
    return {
        "stalls": out["stalls"],
        "goodput": goodput(out["run"], out["start"], window, rates),
        "dup": dup,
        "miss": miss,
        "epochs": epochs,
        "acc": accuracy(out["metrics"]),
        "diff": max_abs_diff(final_model(out["run"]), final_model(ref["run"]))
        if out["ok"]
        else float("nan"),
        "completed": int(out["ok"]),
    }


def trace_lines(figures: dict[str, list], ref_acc: float) -> list[str]:
    """The RESULT lines: live as ours, restart as the baseline where both have the figure."""

    for mode in ("restart", "live"):
        figures.setdefault(mode, [])

    def median(mode: str, key: str) -> float:
        values = [v for f in figures[mode] for v in (f[key] if key == "stalls" else [f[key]])]
        values = [v for v in values if v == v]  # NaN: a kill after which nothing committed
        return statistics.median(values) if values else float("nan")

    def unrecovered(mode: str) -> int:
        return sum(1 for f in figures[mode] for v in f["stalls"] if v != v)

    def total(mode: str, key: str) -> int:
        return sum(f[key] for f in figures[mode])

    nan = float("nan")
    live_acc = statistics.mean(f["acc"] for f in figures["live"]) if figures["live"] else nan
    restart = figures["restart"]
    restart_acc = statistics.mean(f["acc"] for f in restart) if restart else nan
    return [
        result(
            "trace_runs_completed",
            total("live", "completed"),
            total("restart", "completed"),
            "runs",
        ),
        result("trace_kills_never_recovered", unrecovered("live"), unrecovered("restart"), "kills"),
        result("trace_survivor_stall", median("live", "stalls"), median("restart", "stalls"), "s"),
        result("trace_goodput", median("live", "goodput"), median("restart", "goodput"), "ratio"),
        result("trace_ledger_duplicates", total("live", "dup"), total("restart", "dup"), "samples"),
        result("trace_ledger_missing", total("live", "miss"), total("restart", "miss"), "samples"),
        result("trace_test_accuracy_live", live_acc, ref_acc, "fraction"),
        result("trace_test_accuracy_restart", restart_acc, ref_acc, "fraction"),
        result("trace_max_abs_weight_diff", median("live", "diff"), median("restart", "diff"), "1"),
    ]
