"""Can the cluster ever run the worker group? Checked before `fit()`, bounded in time.

Ray would otherwise keep a placement group pending forever when a request can never be met
(8 GPUs per worker on a CPU cluster, more workers than an external cluster's CPUs). Before
training, the driver waits up to `cluster.schedule_timeout_s` for the *alive nodes* (not their
free resources: other jobs may hold those for a while) to be able to host `min_workers`
workers under the placement rule; an autoscaling cluster has that long to add nodes. After that
it fails with one line naming the request and what the cluster has.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from roundhouse.cluster.runtime import ClusterError
from roundhouse.config import ClusterConfig

logger = logging.getLogger(__name__)

POLL_S = 1.0


def worker_resources(cluster: ClusterConfig) -> dict[str, float]:
    """What one worker asks Ray for."""
    resources = {"CPU": cluster.cpus_per_worker}
    if cluster.gpus_per_worker:
        resources["GPU"] = cluster.gpus_per_worker
    return resources


def workers_per_node(node: dict[str, float], per_worker: dict[str, float]) -> int:
    """How many workers fit on a node with total resources `node`."""
    fits = [math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in per_worker.items()]
    return max(0, min(fits)) if fits else 0


def max_workers(nodes: list[dict[str, float]], per_worker: dict[str, float], placement: str) -> int:
    """The largest worker group the nodes can host (`strict_spread`: one per node)."""
    counts = [workers_per_node(node, per_worker) for node in nodes]
    if placement == "strict_spread":
        return sum(1 for c in counts if c > 0)
    return sum(counts)


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected cluster."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def wait_for_capacity(cluster: ClusterConfig, timeout_s: float | None = None) -> None:
    """Return once the cluster can host `min_workers` (else `num_workers`) workers.

    Raises:
        ClusterError: it still cannot after `timeout_s` (default `cluster.schedule_timeout_s`).
    """
    timeout_s = cluster.schedule_timeout_s if timeout_s is None else timeout_s
    needed = cluster.min_workers or cluster.num_workers
    per_worker = worker_resources(cluster)
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = alive_node_resources()
        if max_workers(nodes, per_worker, cluster.placement) >= needed:
            return
        if time.monotonic() >= deadline:
            raise capacity_error(cluster, nodes, timeout_s)
        logger.info("waiting for the cluster to fit %d worker(s) of %s", needed, per_worker)
        time.sleep(POLL_S)


def capacity_error(cluster: ClusterConfig, nodes: list[dict[str, float]], waited_s: float) -> Any:
    """The one-line error for a request the cluster could not fit in time."""
    needed = cluster.min_workers or cluster.num_workers
    totals = {name: sum(node.get(name, 0.0) for node in nodes) for name in ("CPU", "GPU") if nodes}
    have = ", ".join(f"{v:g} {k}" for k, v in totals.items()) or "no resources"
    strict = cluster.placement == "strict_spread"
    spread = " on distinct nodes (placement strict_spread)" if strict else ""
    return ClusterError(
        f"the cluster cannot run {needed} worker(s) of {worker_resources(cluster)}"
        f"{spread} (waited {waited_s:g} s; it has {len(nodes)} node(s) with {have})",
        "lower cluster.num_workers / cpus_per_worker / gpus_per_worker, add nodes, "
        "or raise cluster.schedule_timeout_s for an autoscaling cluster",
    )
