"""`settle`: a re-forming group's coordinator waits for the survivors, not for the dead. A
member is known lost when the driver marks it (`mark_lost`), its `Heartbeat` stops, or its
pulse port refuses a probe (its process is gone: a real process, killed here); a member that
still beats is waited for until the settle time (a store only; the process-level recovery is
in `tests/distributed/test_live_recovery.py`)."""

from __future__ import annotations

import contextlib
import datetime
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import torch.distributed as dist

from roundhouse.parallel.liveness import STALE_S, Heartbeat, Vitals, mark_lost, pulse_port
from roundhouse.parallel.rendezvous import ElasticGroup, GenerationLost, await_generation, settle


def arrive(store: dist.Store, key: str, *members: int) -> None:
    """What `ElasticGroup.reform` writes for each survivor that reached generation `key`."""
    for member in members:
        store.set(f"{key}/member/{member}", "1")
        store.add(f"{key}/arrived", 1)


def timed(store: dist.Store, settle_s: float) -> tuple[list[int], float]:
    started = time.monotonic()
    members = settle(store, "gen1", [0, 1, 2], settle_s)
    return members, time.monotonic() - started


def test_a_member_the_driver_marked_lost_is_not_waited_for() -> None:
    store = dist.HashStore()
    arrive(store, "gen1", 0, 1)
    mark_lost(store, 2)
    members, took = timed(store, settle_s=30.0)
    assert members == [0, 1] and took < 0.5


def test_a_member_whose_heartbeat_stopped_is_lost_after_the_stale_time() -> None:
    store = dist.HashStore()
    beats = [Heartbeat(store, m) for m in (0, 1, 2)]
    time.sleep(0.3)
    beats[2].stop()  # worker 2's process died: its count stands still from now on
    arrive(store, "gen1", 0, 1)
    members, took = timed(store, settle_s=30.0)
    for beat in beats[:2]:
        beat.stop()
    assert members == [0, 1]
    assert STALE_S <= took < STALE_S + 1.0


def test_a_member_that_still_beats_is_waited_for_until_it_arrives() -> None:
    store = dist.HashStore()
    late = Heartbeat(store, 2)  # alive, deep in a long step: it notices the loss later
    arrive(store, "gen1", 0)
    mark_lost(store, 1)
    try:
        members, took = timed(store, settle_s=2.0 * STALE_S + 0.5)
        assert members == [0] and took >= 2.0 * STALE_S  # it waited the whole settle time
        arrive(store, "gen2", 0, 2)
        started = time.monotonic()
        assert settle(store, "gen2", [0, 1, 2], 30.0) == [0, 2]  # 1 is lost, 2 came
        assert time.monotonic() - started < 0.5
    finally:
        late.stop()


def test_the_heartbeat_counts_on_its_own_connection_while_the_group_blocks() -> None:
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    client = dist.TCPStore(
        server.host, server.port, is_master=False, timeout=datetime.timedelta(seconds=2)
    )
    beat = Heartbeat(client, 7)
    try:
        started = time.monotonic()
        with contextlib.suppress(dist.DistStoreError):  # a member blocked in a `get`
            client.get("gen1/members")  # (waiting for its generation's list)
        assert time.monotonic() - started >= 1.5
        assert server.add("beat/7", 0) >= 10  # it kept counting meanwhile
    finally:
        beat.stop()
    count = server.add("beat/7", 0)
    time.sleep(0.3)
    assert server.add("beat/7", 0) == count  # stopped


def test_watching_from_the_loss_counts_the_drain_toward_the_stale_time() -> None:
    """`ElasticGroup.observe` starts the coordinator's watch when it noticed the loss: a
    member dead since then is lost `STALE_S` after that, not after the re-form began."""
    store = dist.HashStore()
    beats = [Heartbeat(store, m) for m in (1, 2)]
    group = ElasticGroup(store, 0, [0, 1, 2])
    try:
        time.sleep(0.3)
        beats[1].stop()  # worker 2 died
        group.observe()  # worker 0 notices the loss at its next collective
        time.sleep(0.6 * STALE_S)  # ... and drains its step
        arrive(store, "gen1", 0, 1)
        started = time.monotonic()
        members = settle(store, "gen1", [0, 1, 2], 30.0, group.vitals)
        took = time.monotonic() - started
    finally:
        beats[0].stop()
    assert members == [0, 1]
    assert 0.3 * STALE_S <= took < 0.6 * STALE_S  # the rest of the stale time only


def test_a_member_silent_since_before_the_loss_was_noticed_is_known_lost_at_once() -> None:
    """Each member's heartbeat reads the others' counts as it beats: a worker killed during
    the others' step, `STALE_S` before they notice, is not waited for at all."""
    store = dist.HashStore()
    beats = [Heartbeat(store, m) for m in (1, 2)]
    group = ElasticGroup(store, 0, [0, 1, 2])
    group.heartbeat = Heartbeat(store, 0, watch=group.others)
    try:
        time.sleep(0.3)
        beats[1].stop()  # worker 2 died
        time.sleep(STALE_S + 0.2)  # worker 0 is deep in its step
        group.observe()  # and notices the loss only now
        arrive(store, "gen1", 0, 1)
        started = time.monotonic()
        members = settle(store, "gen1", [0, 1, 2], 30.0, group.vitals)
        took = time.monotonic() - started
        assert not group.vitals.lost(1)  # worker 1 still beats
    finally:
        for beat in (beats[0], group.heartbeat):
            beat.stop()
    assert members == [0, 1] and took < 0.2


def test_a_join_generation_forms_once_every_member_is_ready() -> None:
    """`await_generation`: each worker of a join generation says it is here, then waits for
    the others (the threads stand for the members and the replacement)."""
    store = dist.HashStore()
    errors: list[BaseException] = []

    def ready(member: int) -> None:
        try:
            await_generation(store, "gen3", [0, 1, 5], member, timeout_s=10.0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=ready, args=(m,)) for m in (0, 1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10.0)
    assert not errors and not any(t.is_alive() for t in threads)


def test_a_replacement_lost_as_it_is_admitted_ends_the_wait_at_once() -> None:
    """A replacement killed between its admission and its connection: the others learn it at
    once from the driver's mark (or its stopped heartbeat), not after the collective timeout
    `init_process_group` would wait, and re-form without it."""
    store = dist.HashStore()
    store.set("gen3/ready/1", "1")  # the other member is here; replacement 5 never comes
    mark_lost(store, 5)
    started = time.monotonic()
    with pytest.raises(GenerationLost, match="worker 5 was lost"):
        await_generation(store, "gen3", [0, 1, 5], 0, timeout_s=60.0)
    assert time.monotonic() - started < 0.5
    beat = Heartbeat(store, 6)  # a replacement that died after its heartbeat started
    time.sleep(0.3)
    beat.stop()
    started = time.monotonic()
    with pytest.raises(GenerationLost, match="worker 6 was lost"):
        await_generation(store, "gen4", [0, 6], 0, timeout_s=60.0)
    assert STALE_S <= time.monotonic() - started < STALE_S + 1.0


def test_a_replacement_waiting_to_be_admitted_again_is_not_waited_for() -> None:
    """The members re-form after a join generation failed; its surviving replacement waits to
    be admitted again (`ElasticGroup.join`), so the coordinator does not wait for it."""
    store = dist.HashStore()
    beat = Heartbeat(store, 5)  # alive, beating, back in the queue
    try:
        store.set("join/5/waiting", "1")
        arrive(store, "gen4", 0, 1)
        started = time.monotonic()
        assert settle(store, "gen4", [0, 1, 5], 30.0) == [0, 1]
        assert time.monotonic() - started < 0.5
    finally:
        beat.stop()


BEATING_MEMBER = """
import sys, time
import torch.distributed as dist
from roundhouse.parallel.liveness import Heartbeat
store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False)
Heartbeat(store, 2, host="127.0.0.1")
print("beating", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def beating_member() -> Iterator[tuple[dist.TCPStore, subprocess.Popen]]:
    """A store on loopback and a separate process whose heartbeat (with its pulse port)
    counts as worker 2."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    member = subprocess.Popen(
        [sys.executable, "-c", BEATING_MEMBER, str(store.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert member.stdout.readline().strip() == "beating"
        yield store, member
    finally:
        member.kill()
        member.wait(timeout=10)


def until_lost(vitals: Vitals, member: int, limit_s: float) -> float:
    """Seconds until `vitals` says `member` is lost (polled as `settle` does), or `limit_s`."""
    started = time.monotonic()
    while not vitals.lost(member) and time.monotonic() - started < limit_s:
        time.sleep(0.005)
    return time.monotonic() - started


@pytest.mark.timeout(60)
def test_a_killed_member_is_known_lost_by_its_refused_pulse_port_long_before_the_stale_time():
    with beating_member() as (store, member):
        vitals = Vitals(store)
        time.sleep(0.3)
        assert not vitals.lost(2)  # alive: its count moves and its port accepts
        assert until_lost(vitals, 2, 0.5) >= 0.5
        member.kill()
        member.wait(timeout=10)
        took = until_lost(vitals, 2, 2 * STALE_S)
    assert took < 0.25 * STALE_S  # its count alone would take STALE_S


@pytest.mark.timeout(60)
def test_a_frozen_member_accepts_its_probes_and_is_lost_only_by_the_stale_time() -> None:
    """A frozen process (a long GC pause, a stopped debugger) may come back: its port still
    accepts, so only its count standing still for `STALE_S` makes it lost."""
    with beating_member() as (store, member):
        vitals = Vitals(store)
        time.sleep(0.3)
        vitals.lost(2)
        member.send_signal(signal.SIGSTOP)
        try:
            took = until_lost(vitals, 2, 3 * STALE_S)
        finally:
            member.send_signal(signal.SIGCONT)
    assert STALE_S - 0.15 <= took < STALE_S + 0.5
    assert not vitals.gone  # never refused


def test_a_pulse_port_opens_on_ipv4_or_ipv6_and_is_left_out_where_it_cannot() -> None:
    """The port listens on the worker's node address, IPv4 or IPv6. Where it cannot open (an
    address not on this machine: 192.0.2.1 is reserved for documentation), the heartbeat
    goes without it and the count alone tells a death."""
    v4 = pulse_port("127.0.0.1")
    assert v4 is not None and v4.getsockname()[0] == "127.0.0.1"
    v4.close()
    if socket.has_ipv6:
        with contextlib.suppress(OSError):  # a machine without IPv6 loopback
            socket.create_server(("::1", 0), family=socket.AF_INET6).close()
            v6 = pulse_port("::1")
            assert v6 is not None and v6.family == socket.AF_INET6
            v6.close()
    store = dist.HashStore()
    beat = Heartbeat(store, 4, host="192.0.2.1")
    try:
        assert beat.pulse is None and not store.check(["pulse/4"])
        time.sleep(0.3)
        assert store.add("beat/4", 0) >= 2  # it counts all the same
    finally:
        beat.stop()
