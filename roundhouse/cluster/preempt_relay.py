"""SIGTERM to the driver of a Ray Train run (`recovery: restart`): hand it on to the workers.

Ray Train runs each worker's train function in a thread of an actor the driver holds no handle
on. So the driver starts a small relay actor (no resources) and passes its handle in the
train-loop config; every worker registers its own actor with it when its train function
starts (again after a restart of the group). On SIGTERM the driver's handler asks the relay to
notify each registered worker: a call on the worker actor's main thread (`__ray_call__`) runs
`trainer.preemption.notify_loops`, as a SIGTERM to that worker would. Every rank then
checkpoints at the same step boundary and returns `preempted`, `fit()` returns, and the driver
raises `Preempted` (one line, exit 143). `--resume latest` continues bit for bit.

The driver repeats the notice every `RESEND_S` until `fit()` returns: a worker that was still
starting (its loop not yet running) is told once its loop runs. If the workers have not
stopped `cluster.preempt_grace_s` plus `DRIVER_MARGIN_S` after the signal, the driver exits
with 143 itself: checkpoints are atomic, so `latest` stays on the last complete one.

A driver that runs in a thread (a sweep's trial, `cluster/sweep/tuner.py`) cannot handle a
signal. There the one who got SIGTERM calls `preempt_drivers()`, and every driver running in
this process's threads (this relay's, and the live group's, `cluster/live_group.py`) hands
it on as if it had got the signal itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from roundhouse.trainer.preemption import EXIT_PREEMPTED, notify_loops

logger = logging.getLogger(__name__)

CONFIG_KEY = "preempt_relay"
RESEND_S = 1.0
DRIVER_MARGIN_S = 15.0  # beyond the workers' grace: their own watchdogs act first


class PreemptRelay:
    """The relay actor: the Ray Train workers of one run, by rank."""

    def __init__(self) -> None:
        self.workers: dict[int, Any] = {}

    def register(self, rank: int, actor: Any) -> None:
        """Worker `rank` (its actor) runs the train function (a restart replaces it)."""
        self.workers[rank] = actor

    def preempt(self) -> int:
        """Tell every registered worker that the driver got SIGTERM; how many were told."""
        for actor in self.workers.values():
            actor.__ray_call__.remote(_notify)
        return len(self.workers)


def _notify(_actor: Any) -> bool:
    return notify_loops()


# Set once this process's drivers running in threads are to preempt their workers.
_DRIVERS_PREEMPTED = threading.Event()
WATCH_S = 0.5  # how often a driver in a thread looks at `drivers_preempted`


def preempt_drivers() -> None:
    """Hand a SIGTERM on to the run drivers in this process's threads (module docstring)."""
    _DRIVERS_PREEMPTED.set()


def drivers_preempted() -> bool:
    """Whether `preempt_drivers` was called in this process."""
    return _DRIVERS_PREEMPTED.is_set()


def start_relay() -> Any:
    """A relay actor for this run (None if Ray cannot start one)."""
    import ray

    try:
        return ray.remote(num_cpus=0)(PreemptRelay).remote()
    except Exception as exc:  # train on; only the driver's SIGTERM is not handed on
        logger.warning("SIGTERM to this driver ends it without a checkpoint (no relay: %s)", exc)
        return None


def register_worker(config: dict[str, Any], rank: int) -> None:
    """On a Ray Train worker: register this worker's actor with the run's relay, if any."""
    import ray

    relay = config.get(CONFIG_KEY)
    if relay is not None:
        relay.register.remote(rank, ray.get_runtime_context().current_actor)


@contextlib.contextmanager
def sigterm_relayed(relay: Any, grace_s: float) -> Iterator[None]:
    """While `fit()` runs: SIGTERM to this driver, or `preempt_drivers()` where the driver
    runs in a thread, preempts the workers (module docstring)."""
    if relay is None:
        yield
        return
    import ray

    done = threading.Event()
    started: list[threading.Thread] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        if started:
            return
        logger.warning("SIGTERM: the workers checkpoint at the next step boundary and stop")
        started.append(threading.Thread(target=hand_on, args=(relay, done, grace_s), daemon=True))
        started[0].start()

    def watch() -> None:
        while not done.wait(WATCH_S):
            if drivers_preempted():
                on_sigterm(signal.SIGTERM, None)
                return

    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    else:  # no handler here: `preempt_drivers()` is how a SIGTERM arrives
        threading.Thread(target=watch, name="roundhouse-preempt-watch", daemon=True).start()
    try:
        yield
    finally:
        done.set()
        if on_main:
            signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            ray.kill(relay)


def hand_on(relay: Any, done: threading.Event, grace_s: float) -> None:
    """Notify the workers every `RESEND_S` until `done`; past the grace period, exit 143."""
    waited = 0.0
    while not done.is_set():
        try:
            relay.preempt.remote()
        except Exception as exc:  # the relay is gone: the run is ending anyway
            logger.debug("preempt relay: %s", exc)
        if done.wait(RESEND_S):
            return
        waited += RESEND_S
        if waited > grace_s + DRIVER_MARGIN_S:
            logger.error(
                "preempted: the workers did not stop within cluster.preempt_grace_s=%ss; "
                "exiting with the last complete checkpoint",
                grace_s,
            )
            os._exit(EXIT_PREEMPTED)
