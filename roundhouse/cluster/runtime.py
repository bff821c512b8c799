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
import socket
from collections.abc import Iterator

from roundhouse.cluster.quiet import forget_session_log, install_console_filter
from roundhouse.config import ClusterConfig
from roundhouse.errors import RoundhouseError

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Task arguments and results up to this size travel inside the call's message instead of
# through the shared-memory object store (Ray's default: 100 KiB). Parameter-server pushes and
# pulls of small models are a few hundred KiB per step; inlined, a round trip costs ~25% less.
INLINE_OBJECT_BYTES = 4 * 1024 * 1024
PROBE_TIMEOUT_S = 5.0


class ClusterError(RoundhouseError):
    """Ray could not be reached or cannot run the job."""


def resolve_address(cluster: ClusterConfig, address: str | None = None) -> str | None:
    """The Ray address to connect to, or None to start an embedded cluster."""
    return address or cluster.address or os.environ.get("RAY_ADDRESS") or None


def embedded_resources(cluster: ClusterConfig, extra_cpus: float = 0.0) -> dict[str, float]:
    """CPUs for an embedded cluster: what the workers (and `extra_cpus`, e.g. parameter
    servers) ask for, at least this machine's."""
    wanted_cpus = cluster.num_workers * cluster.cpus_per_worker + extra_cpus
    num_cpus = max(os.cpu_count() or 1, math.ceil(wanted_cpus))
    # GPUs are left to Ray's detection: declaring GPUs the machine lacks would schedule
    # workers that then fail; a request for more than it has fails in `wait_for_capacity`.
    return {"num_cpus": num_cpus}


@contextlib.contextmanager
def ray_runtime(
    cluster: ClusterConfig, address: str | None = None, *, extra_cpus: float = 0.0
) -> Iterator[str | None]:
    """Connect to (or start) Ray for the duration of the block; yields the address used.

    `extra_cpus`: CPUs an embedded cluster needs beyond the workers' (parameter servers).
    """
    import ray

    target = resolve_address(cluster, address)
    with contextlib.ExitStack() as stack:
        if target is None:
            stack.enter_context(single_machine_mode())
            stack.enter_context(scoped_env(EMBEDDED_TRAIN_ENV))
            start_embedded(embedded_resources(cluster, extra_cpus))
        else:
            connect(target)
        try:
            yield target
        finally:
            ray.shutdown()  # stops an embedded cluster; only disconnects from an external one
            forget_session_log()  # its session folder (and log file) may be gone now


# Ray Train settings for a one-machine cluster, inherited by every Ray process it starts (a
# user's own values win). No node of it can be preempted, so no preemption-watcher actor
# (one more process to start with every worker group); and the controller checks on its
# workers every 0.5 s instead of 2 s, so a run (a sweep's trial) ends that much sooner.
EMBEDDED_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


@contextlib.contextmanager
def scoped_env(defaults: dict[str, str]) -> Iterator[None]:
    """Environment defaults (unset variables only) for the duration of the block."""
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def start_embedded(resources: dict[str, float]) -> None:
    """A one-machine Ray cluster whose every process binds and talks on 127.0.0.1."""
    import ray

    logger.info("starting an embedded Ray cluster on %s (%s)", LOOPBACK, resources)
    ray.init(
        _node_ip_address=LOOPBACK,
        dashboard_host=LOOPBACK,
        logging_level=logging.WARNING,
        configure_logging=False,
        _system_config={"max_direct_call_object_size": INLINE_OBJECT_BYTES},
        **resources,
    )
    install_console_filter()


@contextlib.contextmanager
def single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode while an embedded cluster runs: loopback only.

    `_node_ip_address=127.0.0.1` alone is not enough: Ray still resolves this machine's
    outward IP for its processes, which then listen on every interface. With multi-machine
    clusters disabled (Ray's own switch, the `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` variable that
    Ray's processes inherit, and its constant in this already-imported process), the GCS,
    raylet, dashboard agents and workers bind to and advertise 127.0.0.1 only.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def connect(address: str) -> None:
    """Connect to an existing cluster, turning an unreachable address into a one-line error.

    The address is probed with a plain TCP connection first: Ray itself keeps retrying an
    unreachable GCS for minutes.
    """
    import ray

    probe(address)
    try:
        with loopback_addresses_kept(address):
            ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
        install_console_filter()
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise unreachable(address, str(exc).splitlines()[0]) from None


def unreachable(address: str, reason: str) -> ClusterError:
    """The `ClusterError` for a cluster at `address` that cannot be reached, and why."""
    return ClusterError(
        f"cannot connect to the Ray cluster at {address!r}: {reason}",
        "check --address / RAY_ADDRESS / cluster.address and that the head node is running",
    )


def split_address(address: str) -> tuple[str, int] | None:
    """`(host, port)` of `host:port` or `ray://host:port`; None for `auto` and the like."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Fail fast (one line) when nothing listens at the address's host and port."""
    target = split_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as exc:
        raise unreachable(address, exc.strerror or type(exc).__name__) from None


@contextlib.contextmanager
def loopback_addresses_kept(address: str) -> Iterator[None]:
    """Let `ray.init` connect to a cluster bound to 127.0.0.1.

    Ray rewrites a loopback bootstrap address to this machine's outward-facing IP (so that
    other machines could use it), where a cluster started with `--node-ip-address 127.0.0.1`
    does not listen. Ray skips that rewrite when multi-machine clusters are disabled, which is
    exactly the case of a loopback address, so it is disabled while connecting to one.
    """
    from ray._private import ray_constants

    target = split_address(bootstrap_address(address))
    if target is None or target[0] not in ("127.0.0.1", "localhost", "::1"):
        yield
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def bootstrap_address(address: str) -> str:
    """`auto` resolved as Ray resolves it (RAY_ADDRESS, else the local cluster's address file)."""
    if address != "auto":
        return address
    try:
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment("auto", None) or address
    except Exception:  # let ray.init report it
        return address
