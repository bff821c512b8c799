"""The ps socket data path with a real Ray actor: a `ShardServer` started by the cluster's
service code serves pushes and pulls over its socket; killing the actor fails a waiting pull at
once (not after the shard's wait timeout), and the restarted, empty actor is reached over a
new connection and refuses as not ready until it is initialized again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from roundhouse.cluster.quiet import set_verbose
from roundhouse.cluster.runtime import ray_runtime
from roundhouse.cluster.services import (
    RayServiceGroup,
    service_cpus,
    services_stopped_at_exit,
    start_services,
)
from roundhouse.config.loading import validate_job
from roundhouse.parallel.ps import ServerNotReadyError
from roundhouse.parallel.ps.remote import RemoteParameterStore
from tests.unit.test_ps_local import sgd_setup

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def ps_job(storage: Path) -> object:
    return validate_job(
        {
            "name": "wire",
            "model": {"name": "mlp", "flavor": "debug"},
            "data": {"source": "builtin:digits", "batch_size": 30},
            "strategy": {
                "kind": "ps",
                "num_servers": 1,
                "node_aggregation": False,
                "server_resources": {"CPU": 1},
            },
            "cluster": {"num_workers": 1},
            "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
            "storage": {"path": str(storage)},
        }
    )


@contextlib.contextmanager
def verbose_console() -> Iterator[None]:
    """Ray's notices on the plain log while this test's runtime starts: after a CLI run in this
    process, the quiet console's hidden-lines file still names that run's (deleted) session
    folder (`cluster/quiet.py`), and the token notice of this `ray.init` would fail there."""
    set_verbose(True)
    try:
        yield
    finally:
        set_verbose(False)


def wait_until_back(handle: object, timeout_s: float = 60.0) -> None:
    """Until the restarted actor answers (calls fail while it restarts, as with Ray calls)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(handle.ping.remote(), timeout=5)
            return
        except ray.exceptions.RayError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_shard_actor_serves_the_socket_and_its_death_fails_the_pull_at_once(
    tmp_path: Path,
) -> None:
    import ray

    job = ps_job(tmp_path)
    params = [np.zeros(2, dtype=np.float32), np.ones(1, dtype=np.float32)]
    with verbose_console(), ray_runtime(job.cluster, extra_cpus=service_cpus(job)):
        started = start_services(job)
        with services_stopped_at_exit(started):
            store = RemoteParameterStore(RayServiceGroup(started["ps"]))
            store.initialize(0, sgd_setup("sync", 2), [3, 7], params, None, 0)
            flat = np.array([1.0, 1.0, 2.0], dtype=np.float32)
            store.push(0, 0, 0, [3, 7], flat, [True, True], 1, pull_step=1)  # waits: pusher 1
            assert store.links[0] is not None  # over the socket
            time.sleep(0.5)
            start = time.monotonic()
            ray.kill(started["ps"][0], no_restart=False)
            with pytest.raises(ConnectionError):
                store.pull([0], 0, 1)
            assert time.monotonic() - start < 10  # the shard would have waited 5 s more
            wait_until_back(started["ps"][0])
            with pytest.raises(ServerNotReadyError):  # the restarted actor, a new socket
                store.pull([0], 0, 0)
            store.initialize(0, sgd_setup("async", 1), [3, 7], params, None, 0)
            reply = store.pull([0], 0, 0)[0]
            np.testing.assert_array_equal(reply.flat, [0.0, 0.0, 1.0])
