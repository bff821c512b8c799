"""Whether a worker of the live group is alive: its heartbeat, its pulse port, the driver's mark.

`rendezvous.ElasticGroup` waits for the survivors of a loss and not for the dead; this module
tells them apart. Every member's `Heartbeat` thread counts `beat/<id>` up every `BEAT_S` in
the shared store (on a connection of its own), and a count that stands still for `STALE_S` is
a dead or frozen process. Each beat also reads some of the other members' counts, so a
survivor that notices a loss knows how long the dead one has been silent (`Vitals`, started
from `Heartbeat.seen`). Given a `host`, the heartbeat also listens on a TCP port there
(`pulse/<id>`): a probe that is refused proves the process is gone (the kernel closed its
socket), so a killed worker is known lost in milliseconds while a frozen one, or one whose
host is gone, is known by its count alone. The driver marks a worker whose actor died
(`mark_lost`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

logger = logging.getLogger(__name__)

BEAT_S = 0.1  # how often a member's heartbeat counts in the store
STALE_S = 1.0  # a member whose heartbeat stood still this long is lost (a GC pause is shorter)
WATCH_PER_BEAT = 4  # the most other members a heartbeat reads per beat (in turn, beyond that)
PROBE_EVERY_S = 0.05  # the least time between two probes of one member's pulse port
PROBE_TIMEOUT_S = 0.05  # a probe that neither connects nor is refused by then proves nothing


def mark_lost(store: dist.Store, member: int) -> None:
    """The driver's word that `member`'s process is gone (its actor died): a coordinator
    stops waiting for it at once."""
    store.set(f"lost/{member}", "1")


class Vitals:
    """A coordinator's view of the members it waits for: lost once the driver marked them
    (`mark_lost`), their heartbeat count stood still for `STALE_S`, or, as soon as the count
    has not moved, their pulse port refuses a connection (the process is gone)."""

    def __init__(self, store: dist.Store, seen: dict[int, tuple[int, float]] | None = None):
        self.store = store
        # member -> (count, when it was first read at that count); `seen`: an earlier watch's
        self.seen: dict[int, tuple[int, float]] = dict(seen or {})
        self.probed: dict[int, float] = {}  # member -> when its pulse port was last probed
        self.gone: set[int] = set()  # members whose pulse port refused: dead for good

    def lost(self, member: int) -> bool:
        """Whether `member` is gone, as far as the store and its pulse port tell."""
        if member in self.gone or self.store.check([f"lost/{member}"]):
            return True
        still = self.still_s(member)
        return still >= STALE_S or (still > 0 and self.refused(member))

    def still_s(self, member: int) -> float:
        """How long `member`'s count has stood still as far as this watch knows (0 when it
        moved since the last read, or at the first)."""
        count, now = self.store.add(f"beat/{member}", 0), time.monotonic()
        last = self.seen.get(member)
        if last is None or last[0] != count:
            self.seen[member] = (count, now)
            return 0.0
        return now - last[1]

    def refused(self, member: int) -> bool:
        """Whether `member`'s pulse port refuses a connection (at most one probe every
        `PROBE_EVERY_S`). A connection, a timeout (its host may be gone) or no port on
        record prove nothing."""
        now = time.monotonic()
        if now - self.probed.get(member, -PROBE_EVERY_S) < PROBE_EVERY_S:
            return False
        self.probed[member] = now
        # read at each probe, not kept: a member whose heartbeat restarts (a worker that
        # queues to join again) listens on a new port, and its old one refuses
        if not self.store.check([f"pulse/{member}"]):
            return False
        host, port = self.store.get(f"pulse/{member}").decode().rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S):
                return False
        except ConnectionRefusedError:
            self.gone.add(member)
            return True
        except OSError:
            return False


class Heartbeat:
    """A member's pulse: a daemon thread adds 1 to `beat/<id>` every `BEAT_S` until `stop`.

    With `watch` (the other members, as a call), each beat also reads some of their counts
    (`watch`), so a re-form knows how long a dead member has been silent (`seen`). It talks
    to the store over a connection of its own: a client's blocking `get` (a member
    waiting for its generation's list) holds that client's lock, and would stop the pulse.

    With `host`, it also listens on a TCP port there (`pulse/<id>` in the store) for as long
    as the process lives: the kernel accepts a probe's connection while the process lives,
    even frozen, and refuses it once the process is gone (`Vitals.refused`). Each beat
    closes the connections accepted since the last.
    """

    def __init__(
        self,
        store: dist.Store,
        member: int,
        watch: Callable[[], list[int]] | None = None,
        host: str | None = None,
    ) -> None:
        self.store = own_client(store)
        self.key = f"beat/{member}"
        self.watched = watch  # the other members, whose counts each beat reads
        self.vitals = Vitals(self.store)
        self.turn = 0
        self.pulse = pulse_port(host) if host is not None else None
        if self.pulse is not None:
            self.store.set(f"pulse/{member}", f"{host}:{self.pulse.getsockname()[1]}")
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="roundhouse-heartbeat", daemon=True)
        self.thread.start()

    def run(self) -> None:
        """The thread's loop: count, then sleep `BEAT_S`, until stopped or the store is gone."""
        try:
            while True:
                self.store.add(self.key, 1)
                try:
                    self.watch()
                except Exception as exc:  # a failed read must not stop the pulse
                    logger.debug("heartbeat watch failed: %s", exc)
                self.close_probes()
                if self.stopped.wait(BEAT_S):
                    return
        except Exception:  # the store is gone with its run: nobody listens any more
            return

    def close_probes(self) -> None:
        """Close the probes' connections the pulse port accepted since the last beat."""
        while self.pulse is not None:
            try:
                connection, _ = self.pulse.accept()
            except OSError:  # none waiting (or the port is closed)
                return
            connection.close()

    def watch(self) -> None:
        """Read up to `WATCH_PER_BEAT` other members' counts (in turn, when there are more),
        so `seen` knows since when each one stood still."""
        others = self.watched() if self.watched is not None else []
        for k in range(min(WATCH_PER_BEAT, len(others))):
            self.vitals.still_s(others[(self.turn + k) % len(others)])
        self.turn += WATCH_PER_BEAT

    def seen(self) -> dict[int, tuple[int, float]]:
        """A copy of what `watch` saw: member -> (count, when it was first read at it)."""
        return dict(self.vitals.seen)

    def stop(self) -> None:
        """End the pulse (waiting at most 1 s for the thread) and close its port."""
        self.stopped.set()
        self.thread.join(timeout=1.0)
        if self.pulse is not None:
            self.pulse.close()


def pulse_port(host: str) -> socket.socket | None:
    """A listening, non-blocking TCP socket on a free port of `host` (IPv4 or IPv6), or None
    where none can be opened there: the heartbeat's count alone then tells a death."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, 0), family=family, backlog=64)
    except OSError as exc:
        logger.warning(
            "no pulse port on %s (%s): a lost worker is known by its heartbeat", host, exc
        )
        return None
    listener.setblocking(False)
    return listener


def own_client(store: dist.Store) -> dist.Store:
    """A second client of `store` where it is a TCP store (an in-process store is shared)."""
    if isinstance(store, dist.TCPStore):
        return dist.TCPStore(store.host, store.port, is_master=False, timeout=store.timeout)
    return store
