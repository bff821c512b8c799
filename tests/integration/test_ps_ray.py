"""The `ps` strategy on a real Ray cluster (`ray start`, 4 CPUs, loopback): server actors
started by the driver, handles passed to the Ray Train workers, and recovery from a server's
death: the killed actor restarts empty, the worker group fails and restarts from the latest
checkpoint, rank 0 refills every shard, and the run still ends with the weights of one
process on the whole batch.

Parity at other layouts, async/ssp and resume at another number of workers and servers run on
gloo processes (tests/distributed/test_ps_training.py): Ray Train on one machine reports every
worker on node 0, and each Ray run costs ~30 s of startup.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from roundhouse.launch.cli import main
from tests.distributed.test_ps_training import assert_close, train_single
from tests.helpers.ray_cluster import RayCluster, start_cluster
from tests.helpers.runs import final_weights, only_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    ray_cluster = start_cluster(head_cpus=4, extra_nodes=())
    try:
        with ray_cluster.as_default():
            yield ray_cluster
    finally:
        ray_cluster.stop()


def make_job(name: str, storage: Path, address: str, **overrides: Any) -> dict:
    job: dict[str, Any] = {
        "name": name,
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 30},
        "trainer": {
            "max_steps": 12,
            "log_every_steps": 4,
            "device": "cpu",
            "optimizer": {"name": "sgd", "lr": 0.1},
            "checkpoint": {"every_epoch": False, "keep_last": 10},
        },
        "strategy": {
            "kind": "ps",
            "num_servers": 2,
            "node_aggregation": False,
            "server_resources": {"CPU": 1},
        },
        "cluster": {"address": address, "num_workers": 2},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage)},
    }
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        node = job
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return job


def train_on_ray(job: dict, tmp_path: Path, *args: str) -> Path:
    path = tmp_path / f"{job['name']}.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path), *args]) == 0
    return only_run(Path(job["storage"]["path"]), job["name"])


class ServerKiller(threading.Thread):
    """Kills one server actor once the run's first checkpoint exists (Ray restarts it empty)."""

    def __init__(self, run_parent: Path, name_prefix: str) -> None:
        super().__init__(daemon=True)
        self.run_parent, self.prefix = run_parent, name_prefix
        self.killed_at: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import ray

        while not self.stop.wait(0.02):
            latest = list(self.run_parent.glob("*/checkpoints/latest"))
            if latest and ray.is_initialized():
                run_id = latest[0].parents[1].name
                ray.kill(ray.get_actor(f"{self.prefix}-{run_id}-1"), no_restart=False)
                self.killed_at = latest[0].read_text().strip()
                return


# fasttext: a row table (sparse pushes and pulls, rows sharded over both servers) with sgd
# momentum, whose per-row buffers the refill must restore; every rank pushes its own rows.
MODELS = {
    "mlp": ({}, 1),
    "fasttext": (
        {
            "model": {"name": "fasttext", "flavor": "debug"},
            "data": {"source": "builtin:pydoc-cls", "batch_size": 16, "options": {"seq_len": 64}},
        },
        2,
    ),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_server_death_recovers_from_checkpoint_with_exact_weights(
    cluster: RayCluster, tmp_path: Path, model: str
) -> None:
    storage = tmp_path / "runs"
    sections, pushers = MODELS[model]
    job = make_job(
        "kill",
        storage,
        cluster.gcs_address,
        trainer__max_steps=20,
        trainer__checkpoint__every_steps=5,
        trainer__optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.9},
        cluster__max_failures=1,
        # Both workers share the one node: one pusher per step, through the node group.
        strategy__node_aggregation=True,
        strategy__slow_worker={"rank": 1, "factor": 10.0},  # paces the run; same arithmetic
    )
    job.update(sections)
    killer = ServerKiller(storage / "kill", "roundhouse-ps-kill")
    killer.start()
    try:
        run = train_on_ray(job, tmp_path)
    finally:
        killer.stop.set()
    assert killer.killed_at is not None and killer.killed_at != "step_20"
    rank0 = json.loads((run / "ranks" / "rank_0.json").read_text())
    assert rank0["resume_step"] is not None  # the group restarted from a checkpoint
    state = torch.load(run / "checkpoints" / "step_20" / "state.pt", weights_only=True)
    assert state["strategy"]["ps"]["num_pushers"] == pushers
    # The restarted servers were refilled from the checkpoint: no step lost or repeated.
    assert_close(final_weights(run), final_weights(train_single(job)))
