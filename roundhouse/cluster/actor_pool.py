"""Warm worker actors: the live group's actors outlive a run and serve the next one.

Starting a worker process, importing torch and roundhouse in it and placing it cost seconds
per run. With `cluster.keep_warm_s > 0` the live group's actors (`cluster.recovery: live`)
are detached named actors in the `roundhouse-pool` namespace, named `<key>.<id>`:

- the key says what makes two workers interchangeable: their resources, the Ray runtime
  environment, the secrets they hold (hashed), the Python, Ray and torch versions, a hash of
  roundhouse's own code and of the user modules the job names (`pool_key`); only actors of
  the same key are reused;
- a run claims idle actors of its key (`claim_idle`); the actor answers `claim` itself, one
  call at a time, so two runs (a sweep's concurrent trials) never get the same actor;
- a claimed actor holds a lease that its driver renews on every poll; a driver that dies (a
  crash, `kill -9`, a sweep stopping a trial) stops renewing, and the actor ends its process
  after `LEASE_S` (`Lease.expired`);
- at the end of a successful run the driver releases its actors; an idle actor ends itself
  after `keep_warm_s` (`Lease.idle_for`); a run that needs fresh actors first ends idle ones
  of other keys, which hold resources it may need (`evict_idle`).

The embedded cluster ends with `roundhouse train`, and its actors with it: reuse pays off on
a cluster that outlives the run (`--address`) and across the trials of one sweep.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import platform
import re
import secrets
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

from roundhouse.config import JobSpec

logger = logging.getLogger(__name__)

POOL_NAMESPACE = "roundhouse-pool"
LEASE_S = 15.0  # a claim not renewed for this long belongs to a dead driver
CLAIM_TIMEOUT_S = 5.0


@cache
def code_fingerprint() -> str:
    """A hash of roundhouse's own source files (a worker must run the driver's code)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


USER_REFERENCE = re.compile(r"^([A-Za-z_][\w.]*):[A-Za-z_]\w*$")  # `package.module:name`


def user_code_fingerprint(job: JobSpec) -> str:
    """A hash of the user modules the job names (`model.name: my.models:build`, a task's
    `module:Class`): a warm worker has them imported, so a changed file needs fresh workers."""
    digest = hashlib.sha256()
    for value in sorted(set(strings_in(job.model_dump(mode="json")))):
        match = USER_REFERENCE.match(value)
        origin = module_file(match.group(1)) if match else None
        if origin is not None:
            digest.update(value.encode())
            digest.update(origin.read_bytes())
    return digest.hexdigest()


def strings_in(value: Any) -> list[str]:
    """Every string inside a JSON-like value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    return []


def module_file(name: str) -> Path | None:
    """The source file of module `name`, if it is one that can be found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a parent package that does not import: not a module
        return None
    origin = getattr(spec, "origin", None)
    return Path(origin) if origin and origin.endswith(".py") and Path(origin).is_file() else None


def pool_key(job: JobSpec, runtime_env: dict[str, Any] | None) -> str:
    """The name prefix of the actors that can serve `job` (see the module docstring)."""
    import ray
    import torch

    cluster = job.cluster
    identity = {
        "cpus": cluster.cpus_per_worker,
        "gpus": cluster.gpus_per_worker,
        "runtime_env": runtime_env or {},  # secrets only as part of this hash, never named
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "code": code_fingerprint(),
        "user_code": user_code_fingerprint(job),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return "w" + hashlib.sha256(text.encode()).hexdigest()[:16]


def new_token() -> str:
    """A run's claim token."""
    return secrets.token_hex(8)


class Lease:
    """An actor's side of the pool: who claimed it, and when its claimant or idleness ends it.

    Args:
        keep_warm_s: how long the actor waits idle for another run before it ends itself.
        token: the run that started the actor (it holds the claim from the start).
    """

    def __init__(self, keep_warm_s: float, token: str | None = None) -> None:
        self.keep_warm_s = keep_warm_s
        self.token = token  # a fresh actor starts claimed by the run that started it
        self.renewed = time.monotonic()  # last claim renewal, or when it became idle
        self.lock = threading.Lock()

    def claim(self, token: str) -> bool:
        """Take the actor for the run `token`; False when another run holds it."""
        with self.lock:
            if self.token is not None and self.token != token:
                return False
            self.token, self.renewed = token, time.monotonic()
            return True

    def renew(self, token: str) -> None:
        """The run `token` is alive (its driver polled); raise if it does not hold the actor."""
        with self.lock:
            if self.token != token:
                raise RuntimeError(f"this worker is not claimed by run {token}")
            self.renewed = time.monotonic()

    def release(self) -> None:
        """Idle again, from now."""
        with self.lock:
            self.token, self.renewed = None, time.monotonic()

    def expired(self) -> bool:
        """Claimed, and its driver has not renewed the claim for `LEASE_S`."""
        with self.lock:
            return self.token is not None and time.monotonic() - self.renewed > LEASE_S

    def idle_for(self) -> float:
        """Seconds idle (0 while claimed)."""
        with self.lock:
            return 0.0 if self.token is not None else time.monotonic() - self.renewed

    def watch(self, end_process: Any, period_s: float = 1.0) -> threading.Thread:
        """A daemon thread that calls `end_process(reason)` when the lease expires or the
        actor stayed idle for `keep_warm_s`."""

        def loop() -> None:
            while True:
                time.sleep(period_s)
                if self.expired():
                    end_process(f"its run's driver stopped polling for {LEASE_S:g} s")
                elif self.idle_for() > self.keep_warm_s:
                    end_process(f"idle for cluster.keep_warm_s={self.keep_warm_s:g} s")

        thread = threading.Thread(target=loop, name="roundhouse-lease", daemon=True)
        thread.start()
        return thread


def pooled_names(prefix: str = "") -> list[str]:
    """Names of the live pool actors whose names start with `prefix`."""
    import ray

    return sorted(
        entry["name"]
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry.get("namespace") == POOL_NAMESPACE and entry["name"].startswith(prefix)
    )


def claim_named(names: list[str], token: str, wanted: int | None) -> list[tuple[str, Any]]:
    """Claim up to `wanted` (None: all) of the named pool actors for `token`: their names and
    handles. Extras and actors that are gone or busy are left alone."""
    import ray

    handles, calls = [], []
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=POOL_NAMESPACE)
        except ValueError:  # ended since it was listed
            continue
        handles.append((name, handle))
        calls.append(handle.claim.remote(token))
    claimed = []
    for (name, handle), call in zip(handles, calls, strict=True):
        try:
            won = ray.get(call, timeout=CLAIM_TIMEOUT_S)
        except Exception:  # gone, or busy past the timeout: not ours
            continue
        if won and (wanted is None or len(claimed) < wanted):
            claimed.append((name, handle))
        elif won:
            handle.release.remote(token)
    return claimed


def claim_idle(
    key: str, wanted: int, token: str, exclude: set[str] | None = None
) -> list[tuple[str, Any]]:
    """Up to `wanted` idle actors of `key` (but those named in `exclude`: the run's own),
    claimed for the run `token`: their names and handles."""
    if wanted <= 0:
        return []
    names = [name for name in pooled_names(key + ".") if name not in (exclude or set())]
    return claim_named(names, token, wanted)


def evict_idle(keep_key: str | None = None) -> int:
    """End the idle pool actors of every key but `keep_key` (they hold resources another
    run may need); return how many."""
    import ray

    others = [n for n in pooled_names() if keep_key is None or not n.startswith(keep_key + ".")]
    if not others:
        return 0
    evicted = claim_named(others, new_token(), None)
    for _, handle in evicted:
        ray.kill(handle)
    if evicted:
        logger.info("ended %d idle warm worker(s) of other jobs", len(evicted))
    return len(evicted)
