"""A real Ray cluster for end-to-end tests: `ray start` head + extra nodes on 127.0.0.1.

Several test sessions may start clusters on the same machine at the same time, so every port
is chosen free (no Ray default port is used) and every cluster has its own short temp dir
(unix socket paths must stay under ~107 characters). Teardown kills exactly the processes this
cluster started, by process id — never `ray stop`, which would stop everyone's clusters.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from roundhouse.parallel.net import free_port

RAY = str(Path(sys.executable).with_name("ray"))
START_TIMEOUT_S = 90
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's multi-machine switch


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(size: int = 40) -> tuple[int, int]:
    """A range of currently free ports below the kernel's ephemeral range (for worker ports)."""
    for _ in range(200):
        low = random.randrange(12000, 32000 - size)
        if all(_bindable(p) for p in range(low, low + size)):
            return low, low + size - 1
    raise RuntimeError("no free port range found")


class Ports:
    """Free ports, each handed out once: the kernel may offer a just-closed port again, and
    Ray refuses to start when two of its components are given the same port."""

    def __init__(self) -> None:
        self.given: set[int] = set()

    def __call__(self) -> int:
        for _ in range(100):
            port = free_port()
            if port not in self.given:
                self.given.add(port)
                return port
        raise RuntimeError("no distinct free port found")

    def node(self) -> list[str]:
        """`ray start` options giving one node its own free ports."""
        low, high = free_port_range()
        return [
            f"--node-manager-port={self()}",
            f"--object-manager-port={self()}",
            f"--min-worker-port={low}",
            f"--max-worker-port={high}",
            f"--dashboard-agent-listen-port={self()}",
            f"--dashboard-agent-grpc-port={self()}",
            f"--runtime-env-agent-port={self()}",
            f"--metrics-export-port={self()}",
        ]


@dataclass
class RayCluster:
    """A head node (with the dashboard on loopback) plus worker nodes, all on 127.0.0.1."""

    temp_dir: str
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    pids: set[int] = field(default_factory=set)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def ray_start(self, *options: str, single_machine: bool = False) -> None:
        """`ray start` one node on 127.0.0.1.

        `single_machine`: Ray's single-machine mode, in which the GCS, raylet, dashboard and
        client server listen on 127.0.0.1 only (with `--node-ip-address` alone they listen on
        every interface). Other nodes cannot join such a head, so a multi-node cluster runs
        without it, on explicit 127.0.0.1 node addresses.
        """
        before = set(self.our_pids())
        cmd = [RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *options]
        env = {**self.env, SINGLE_MACHINE_ENV: "0" if single_machine else "1"}
        result = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=START_TIMEOUT_S
        )
        self.pids |= set(self.our_pids()) - before
        if result.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{result.stdout}\n{result.stderr}")

    def our_pids(self) -> list[int]:
        """Ray daemons whose command line names this cluster's temp dir or GCS port."""
        # The GCS port in any address form: Ray's client server names the GCS by the
        # machine's IP, not 127.0.0.1.
        marks = (self.temp_dir, f":{self.gcs_port} ", f"={self.gcs_address}")
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or []) + " "
            if any(mark in cmdline for mark in marks):
                found.append(proc.info["pid"])
        return found

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}

    @contextlib.contextmanager
    def as_default(self) -> Iterator[RayCluster]:
        """This process's Ray auth settings are the cluster's while the block runs."""
        keys = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")
        saved = {k: os.environ.get(k) for k in keys}
        for key in keys:
            if key in self.env:
                os.environ[key] = self.env[key]
            else:
                os.environ.pop(key, None)
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def wait_ready(self, num_nodes: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until the dashboard answers and `num_nodes` nodes are alive."""
        deadline = time.monotonic() + timeout_s
        alive = -1
        while time.monotonic() < deadline:
            try:
                reply = requests.get(
                    f"{self.dashboard_url}/nodes?view=summary",
                    headers=self.auth_headers(),
                    timeout=5,
                ).json()
                summary = reply["data"]["summary"]
                alive = sum(1 for node in summary if node["raylet"]["state"] == "ALIVE")
                if alive >= num_nodes:
                    return
            except (requests.RequestException, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"Ray cluster not ready: {alive} of {num_nodes} nodes alive")

    def stop(self) -> None:
        """Kill every process this cluster started (and their children), by pid."""
        procs: dict[int, psutil.Process] = {}
        for pid in self.pids | set(self.our_pids()):
            try:
                proc = psutil.Process(pid)
                procs[pid] = proc
                for child in proc.children(recursive=True):
                    procs[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        for proc in procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(list(procs.values()), timeout=20)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(head_cpus: int = 2, extra_nodes: tuple[int, ...] = (1,)) -> RayCluster:
    """Start a head with `head_cpus` CPUs and one extra node per entry of `extra_nodes`.

    Token authentication, as Ray enables by default. The token is this process's
    `RAY_AUTH_TOKEN` (tests/conftest.py sets one per test session): Ray reads the token once
    per process, so a cluster with a token of its own could not be joined by a process that
    ran an embedded cluster before.
    """
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
        # As on a cluster image: the `roundhouse` command on the PATH of every node.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    ports = Ports()
    cluster = RayCluster(temp_dir, ports(), ports(), env)
    try:
        cluster.ray_start(
            "--head",
            f"--port={cluster.gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={cluster.dashboard_port}",
            f"--ray-client-server-port={ports()}",
            f"--num-cpus={head_cpus}",
            "--num-gpus=0",
            f"--temp-dir={temp_dir}",
            *ports.node(),
            single_machine=not extra_nodes,
        )
        for cpus in extra_nodes:
            cluster.ray_start(
                f"--address={cluster.gcs_address}",
                f"--num-cpus={cpus}",
                "--num-gpus=0",
                *ports.node(),
            )
        cluster.wait_ready(1 + len(extra_nodes))
    except BaseException:
        cluster.stop()
        raise
    return cluster
