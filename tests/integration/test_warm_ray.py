"""On a warm Ray cluster (`ray start`, reached with `cluster.address`):

- the live group's actors outlive a run (`cluster.keep_warm_s`) and the next run reuses them,
  training bit for bit as on fresh actors;
- SIGTERM to a Ray Train worker (the default `recovery: restart` path, whose train function
  runs in a thread) writes a complete checkpoint, ends the run with one line and exit 143, and
  `--resume latest` continues bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from roundhouse.cluster import actor_pool
from roundhouse.cluster.actor_pool import Lease, evict_idle, pooled_names
from roundhouse.cluster.live_group import LiveWorkers
from roundhouse.cluster.live_placement import Placement
from roundhouse.cluster.runtime import ray_runtime
from roundhouse.config import ClusterConfig
from roundhouse.launch.cli import main
from tests.helpers.ray_cluster import RayCluster, start_cluster
from tests.helpers.runs import assert_same_weights, final_weights, only_run, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
STEPS = 24  # of the SIGTERM tests' job


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    ray_cluster = start_cluster(head_cpus=2, extra_nodes=())
    try:
        with ray_cluster.as_default():
            yield ray_cluster
    finally:
        ray_cluster.stop()


@pytest.fixture(scope="module")
def uninterrupted(cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final weights of an uninterrupted run of `slow_job`. Both recovery modes run the
    same ring on the same 2 ranks, so one run (on the live group, the quicker to start) is
    every SIGTERM test's reference."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", str(slow_job(cluster, tmp_path, "whole", "live"))]) == 0
    return final_weights(only_run(tmp_path / "whole", "warm"))


def make_job(storage: Path, address: str, **cluster: object) -> dict:
    return {
        "name": "warm",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 64},
        "trainer": {
            "max_steps": 12,
            "max_epochs": None,
            "log_every_steps": 4,
            "device": "cpu",
            "optimizer": {"name": "sgd", "lr": 0.1},
            "checkpoint": {"every_epoch": False, "every_steps": 6},
        },
        "strategy": {"kind": "ring"},
        "cluster": {"num_workers": 2, "address": address, **cluster},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage)},
    }


def train(tmp_path: Path, name: str, job: dict, *extra: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path), *extra]) == 0
    return only_run(Path(job["storage"]["path"]), "warm")


def warm_actors(address: str) -> list[str]:
    with ray_runtime(ClusterConfig(), address):
        return pooled_names()


def end_warm_actors(address: str) -> None:
    with ray_runtime(ClusterConfig(), address):
        evict_idle()


def test_a_second_run_reuses_the_warm_actors_and_trains_as_on_fresh_ones(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """Two different runs back to back on the same warm actors end with the weights of the
    same two runs on fresh actors (nothing of the first leaks into the second)."""
    address = cluster.gcs_address
    weights = {}
    for mode, keep in (("fresh", 0), ("warm", 60)):
        for seed in (1, 2):
            job = make_job(tmp_path / f"{mode}{seed}", address, recovery="live", keep_warm_s=keep)
            job["trainer"]["seed"] = seed
            job["trainer"]["optimizer"]["lr"] = 0.1 * seed
            weights[mode, seed] = final_weights(train(tmp_path, f"{mode}{seed}", job))
            actors = warm_actors(address)
            assert len(actors) == (0 if keep == 0 else 2), actors
            if (mode, seed) == ("warm", 1):
                first = actors
        if mode == "warm":
            assert actors == first  # the second run ran on the first run's actors
    for seed in (1, 2):
        assert_same_weights(weights["fresh", seed], weights["warm", seed])


def test_a_sweeps_trials_reuse_the_actors_of_the_trials_before_them(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """One trial at a time fits (2 CPUs, 1-worker trials); the standby trial claims the actor
    its predecessor released instead of waiting for a fresh one."""
    address = cluster.gcs_address
    end_warm_actors(address)  # those of the tests before
    job = make_job(tmp_path / "runs", address, recovery="live", keep_warm_s=60, num_workers=1)
    job["trainer"].update(max_steps=None, max_epochs=1, log_every_steps=5)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(job))
    search = "trainer.optimizer.lr=choice(0.01,0.03,0.1)"
    args = ["--search", search, "--searcher", "grid", "--scheduler", "fifo"]
    assert main(["tune", str(path), "--address", address, *args, "--metric", "val/accuracy"]) == 0
    ranks = list((tmp_path / "runs" / "warm").glob("tune-*/*/ranks/rank_0.json"))
    pids = {json.loads(rank.read_text())["pid"] for rank in ranks}
    assert len(ranks) == 3 and len(pids) == 1, pids  # three trials, one worker process
    assert len(warm_actors(address)) == 1


class SlowToStart:
    """A stand-in for a pooled `LiveWorker`: up after `delay_s` (a node that comes up late),
    then it ends its process when its claim goes unrenewed for `LEASE_S` (3 s here)."""

    def __init__(self, delay_s: float, token: str) -> None:
        time.sleep(delay_s)
        actor_pool.LEASE_S = 3.0
        self.lease = Lease(keep_warm_s=600, token=token)
        self.lease.watch(lambda reason: os._exit(0), period_s=0.2)

    def ready(self) -> int:
        return os.getpid()

    def renew(self, token: str) -> None:
        self.lease.renew(token)


class StaggeredPlacement(Placement):
    """Fresh pooled actors (claimed from their start) that come up `delays` s after they are
    asked for."""

    pooled = True

    def __init__(self, delays: list[float]) -> None:
        self.cluster, self.runtime_env, self.delays = ClusterConfig(), None, delays

    def spawn(self, bundle: int, token: str) -> Any:
        import ray

        return ray.remote(num_cpus=0)(SlowToStart).remote(self.delays[bundle], token)


def test_actors_up_early_keep_their_claim_while_the_others_start(cluster: RayCluster) -> None:
    """One actor is up at once, the other 8 s later: the driver renews the early one's claim
    while it waits (before, its 3-s lease ran out and it ended itself)."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with ray_runtime(ClusterConfig(), cluster.gcs_address):
        config = ClusterConfig(num_workers=2, schedule_timeout_s=60)
        group = LiveWorkers(StaggeredPlacement([0.0, 8.0]), config, ("127.0.0.1", 0))
        group.gather()
        pids = ray.get([actor.ready.remote() for actor, _ in group.ready], timeout=30)
        assert len(set(pids)) == 2
        for actor in group.used:
            ray.kill(actor)


def test_warm_actors_of_another_kind_make_way_for_a_ray_train_run(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """A run that needs the resources warm actors hold ends them instead of waiting."""
    address = cluster.gcs_address
    job = make_job(tmp_path / "live", address, recovery="live", keep_warm_s=300)
    train(tmp_path, "live", job)
    assert len(warm_actors(address)) == 2  # they hold both CPUs of the cluster
    job = make_job(tmp_path / "restart", address, schedule_timeout_s=60)
    train(tmp_path, "restart", job)
    assert warm_actors(address) == []


@pytest.mark.parametrize(
    ("recovery", "target"),
    [("restart", "worker"), ("restart", "driver"), ("live", "worker"), ("live", "driver")],
)
def test_sigterm_to_a_worker_checkpoints_and_resumes_bit_for_bit(
    cluster: RayCluster,
    uninterrupted: dict[str, Any],
    tmp_path: Path,
    recovery: str,
    target: str,
) -> None:
    """restart: Ray Train's worker, whose loop runs in a thread, or the driver, which hands
    SIGTERM on through its relay actor; live: a warm actor of the own group (its loop runs in
    a thread too), or the driver, which hands SIGTERM on."""
    job = slow_job(cluster, tmp_path, "preempted", recovery)
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "roundhouse.launch.cli", "train", str(job)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for_step(tmp_path / "preempted", 4, proc)
        record = json.loads((run / "ranks" / "rank_1.json").read_text())
        os.kill(record["pid"] if target == "worker" else proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    latest = (run / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert 4 <= step < STEPS
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"preempted at step {step}: checkpoint" in lines[0], err
    # Resumed on the live group, the quicker to start: the checkpoint is the same either way
    assert main(["train", str(job), "--resume", "latest", "cluster.recovery=live"]) == 0
    assert_same_weights(uninterrupted, final_weights(run))


def slow_job(cluster: RayCluster, tmp_path: Path, name: str, recovery: str) -> Path:
    """A `STEPS`-step job file whose steps take at least 0.2 s (a SIGTERM lands mid-run)."""
    job = make_job(tmp_path / name, cluster.gcs_address, recovery=recovery)
    job["model"] = {"name": "tests.helpers.models:slow_mlp", "flavor": "default"}
    job["model"]["options"] = {"delay_s": 0.2}
    job["trainer"].update(max_steps=STEPS, log_every_steps=1, checkpoint={"every_epoch": False})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def wait_for_step(storage: Path, step: int, proc: subprocess.Popen) -> Path:
    """The run folder once its metrics reach `step` (the run must still be going)."""
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"no step {step}"
        runs = list((storage / "warm").glob("*/metrics.jsonl"))
        try:
            if runs and any(row["step"] >= step for row in read_metrics(runs[0].parent)):
                return runs[0].parent
        except ValueError:  # a line being written
            pass
        time.sleep(0.1)
