"""The Ray runtime a job runs on: an embedded cluster on 127.0.0.1, or an existing one.

Without an address roundhouse starts Ray on loopback only (the dashboard too), sized from the
job's `cluster:` section, and shuts it down when the job ends — also on Ctrl-C and on errors.
With an address (the job's `cluster.address`, `--address`, or `RAY_ADDRESS`) it connects and
leaves the cluster running.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

from roundhouse.errors import RoundhouseError
from roundhouse.spec import ClusterConfig

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


class ClusterError(RoundhouseError):
    """Ray could not be reached or cannot run the job."""


def resolve_address(cluster: ClusterConfig, address: str | None = None) -> str | None:
    """The Ray address to connect to, or None to start an embedded cluster."""
    return address or cluster.address or os.environ.get("RAY_ADDRESS") or None


def embedded_resources(cluster: ClusterConfig) -> dict[str, float]:
    """CPUs/GPUs for an embedded cluster: what the workers ask for, at least this machine's."""
    wanted_cpus = cluster.num_workers * cluster.cpus_per_worker
    num_cpus = max(os.cpu_count() or 1, math.ceil(wanted_cpus))
    return {
        "num_cpus": num_cpus,
        "num_gpus": math.ceil(cluster.num_workers * cluster.gpus_per_worker),
    }


@contextlib.contextmanager
def ray_runtime(cluster: ClusterConfig, address: str | None = None) -> Iterator[str | None]:
    """Connect to (or start) Ray for the duration of the block; yields the address used."""
    import ray

    target = resolve_address(cluster, address)
    if target is None:
        resources = embedded_resources(cluster)
        logger.info("starting an embedded Ray cluster on %s (%s)", LOOPBACK, resources)
        ray.init(
            _node_ip_address=LOOPBACK,
            dashboard_host=LOOPBACK,
            logging_level=logging.WARNING,
            configure_logging=False,
            **resources,
        )
    else:
        connect(target)
    try:
        yield target
    finally:
        ray.shutdown()  # stops an embedded cluster; only disconnects from an external one


def connect(address: str) -> None:
    """Connect to an existing cluster, turning an unreachable address into a one-line error."""
    import ray

    try:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise ClusterError(
            f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}",
            "check --address / RAY_ADDRESS / cluster.address and that the head node is running",
        ) from None
