"""The warm pool's lease (who holds a warm actor, when it ends itself) and SIGTERM forwarded
from a process's main thread to a loop running in another thread (Ray Train's workers, the
live group's actors)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from roundhouse.cluster import actor_pool
from roundhouse.cluster.actor_pool import Lease

ROOT = Path(__file__).resolve().parents[2]


def test_a_claimed_actor_cannot_be_claimed_by_another_run_until_released() -> None:
    lease = Lease(keep_warm_s=60)
    assert lease.claim("a") and lease.claim("a")  # the holder may claim again
    assert not lease.claim("b")
    with pytest.raises(RuntimeError, match="not claimed by run b"):
        lease.renew("b")
    assert lease.idle_for() == 0.0
    lease.release()
    assert lease.claim("b") and lease.token == "b"


def test_a_fresh_actor_starts_claimed_by_the_run_that_started_it() -> None:
    lease = Lease(keep_warm_s=60, token="mine")
    assert not lease.claim("other") and lease.claim("mine")


def test_claims_are_atomic_under_concurrent_runs() -> None:
    lease = Lease(keep_warm_s=60)
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def contend(token: str) -> None:
        barrier.wait()
        if lease.claim(token):
            winners.append(token)

    threads = [threading.Thread(target=contend, args=(f"run{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(winners) == 1 and lease.token == winners[0]


def test_an_unrenewed_claim_expires_and_an_idle_actor_ends_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(actor_pool, "LEASE_S", 0.2)
    lease = Lease(keep_warm_s=0.3, token="dead-driver")
    reasons: list[str] = []
    lease.watch(reasons.append, period_s=0.05)
    deadline = time.monotonic() + 10
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reasons and "stopped polling" in reasons[0]
    lease.release()
    reasons.clear()
    while not reasons and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reasons and "idle for cluster.keep_warm_s=0.3 s" in reasons[0]


FORWARDED = r"""
import os, signal, threading, time
from roundhouse.trainer.preemption import PreemptionGuard, forward_sigterm_to_loops

seen = []
signal.signal(signal.SIGTERM, lambda *_: seen.append("previous"))
guard = PreemptionGuard(grace_s=30)
installed = threading.Event()
go_on = threading.Event()

def loop():  # a training loop in a thread: it cannot install a handler itself
    guard.install()
    installed.set()
    go_on.wait(10)
    guard.uninstall()

assert forward_sigterm_to_loops()
thread = threading.Thread(target=loop)
thread.start()
installed.wait(10)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)  # the main thread runs Python: the handler runs
print("loop signalled:", guard.signalled_at is not None, "previous:", seen)
go_on.set()
thread.join(10)
os.kill(os.getpid(), signal.SIGTERM)  # no loop runs now: the previous handler gets it
time.sleep(0.2)
print("after:", seen)
"""


def test_sigterm_reaches_a_loop_in_another_thread_through_the_forwarder() -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORWARDED],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert "loop signalled: True previous: []" in out.stdout, out.stdout
    assert "after: ['previous']" in out.stdout, out.stdout


def test_only_interchangeable_workers_share_a_pool_key() -> None:
    from roundhouse.cluster.actor_pool import pool_key
    from roundhouse.config import JobSpec

    def key(runtime_env: dict | None = None, **cluster: object) -> str:
        job = JobSpec.model_validate({"name": "k", "model": {"name": "mlp"}, "cluster": cluster})
        return pool_key(job, runtime_env)

    base = key(num_workers=2)
    assert key(num_workers=4, keep_warm_s=5) == base  # group size and keep time: same workers
    assert key(cpus_per_worker=2) != base
    assert key({"env_vars": {"WANDB_API_KEY": "a"}}) != key({"env_vars": {"WANDB_API_KEY": "b"}})
    assert re.fullmatch(r"w[0-9a-f]{16}", base)  # a hash: no secret in an actor's name


def test_a_changed_user_model_file_needs_fresh_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm worker has the job's user modules imported: editing one changes the key."""
    from roundhouse.cluster.actor_pool import user_code_fingerprint
    from roundhouse.config import JobSpec

    (tmp_path / "my_models_for_pool.py").write_text("def build(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    job = JobSpec.model_validate({"name": "k", "model": {"name": "my_models_for_pool:build"}})
    before = user_code_fingerprint(job)
    (tmp_path / "my_models_for_pool.py").write_text("def build(): return 1\n")
    assert user_code_fingerprint(job) != before
    plain = JobSpec.model_validate({"name": "k", "model": {"name": "mlp"}})
    assert user_code_fingerprint(plain) == user_code_fingerprint(plain.model_copy(deep=True))
