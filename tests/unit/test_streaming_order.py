"""Property tests for the streaming partition: each sample exactly once, world-free order."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roundhouse.data.streaming.order import Layout, epoch_order, plan_epoch
from roundhouse.errors import DataError

layouts = st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=5).map(
    lambda shards: Layout(tuple(tuple(b) for b in shards))
)


def _epoch_rows(order, *, batch, world, accum, workers, remainder, samples_done=0):
    """Rows per global step, gathered over every (rank, worker) exactly as they are served."""
    plan = plan_epoch(
        order,
        samples_done=samples_done,
        global_batch_size=batch,
        world_size=world,
        grad_accum_steps=accum,
        remainder=remainder,
    )
    steps = {}
    for rank in range(world):
        for worker in range(workers):
            for step in range(worker, plan.num_steps, workers):
                rows = np.concatenate(plan.micro_rows(step, rank))
                steps.setdefault(step, []).append(rows)
    return [np.sort(np.concatenate(steps[s])) for s in sorted(steps)]


@settings(max_examples=60, deadline=None)
@given(
    layout=layouts,
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
    world=st.integers(1, 4),
    accum=st.integers(1, 3),
    workers=st.integers(1, 3),
    extra=st.integers(0, 5),
    buffer_rows=st.integers(1, 20),
)
def test_partition_covers_every_sample_exactly_once(
    layout, seed, epoch, world, accum, workers, extra, buffer_rows
):
    order = epoch_order(layout, seed=seed, epoch=epoch, shuffle=True, buffer_rows=buffer_rows)
    assert sorted(order.tolist()) == list(range(layout.num_rows))
    batch = world * accum + extra
    full, rest = divmod(layout.num_rows, batch)
    for remainder in ("drop", "partial", "pad"):
        seen = Counter(
            np.concatenate(
                _epoch_rows(
                    order,
                    batch=batch,
                    world=world,
                    accum=accum,
                    workers=workers,
                    remainder=remainder,
                )
                or [np.zeros(0, int)]
            ).tolist()
        )
        if remainder == "pad":
            assert set(seen) == set(range(layout.num_rows)) or full + (rest > 0) == 0
            assert sum(seen.values()) == (full + (rest > 0)) * batch
        else:
            kept = full * batch + (rest if remainder == "partial" and rest >= world * accum else 0)
            assert sorted(seen) == sorted(order[:kept].tolist())
            assert max(seen.values(), default=1) == 1


@settings(max_examples=40, deadline=None)
@given(
    layout=layouts,
    seed=st.integers(0, 5),
    worlds=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    cut=st.integers(0, 6),
)
def test_step_sets_depend_on_seed_and_epoch_only(layout, seed, worlds, cut):
    order = epoch_order(layout, seed=seed, epoch=1, shuffle=True, buffer_rows=7)
    again = epoch_order(layout, seed=seed, epoch=1, shuffle=True, buffer_rows=7)
    np.testing.assert_array_equal(order, again)
    batch = 4 * 3
    a = _epoch_rows(order, batch=batch, world=worlds[0], accum=1, workers=2, remainder="drop")
    b = _epoch_rows(order, batch=batch, world=worlds[1], accum=3, workers=1, remainder="drop")
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    # Elastic resume: steps done on one world, the rest on another, equal the whole epoch.
    cut = min(cut, len(a))
    rest = _epoch_rows(
        order,
        batch=batch,
        world=worlds[1],
        accum=1,
        workers=3,
        remainder="drop",
        samples_done=cut * batch,
    )
    assert [x.tolist() for x in a[:cut] + rest] == [x.tolist() for x in a]


def test_different_epochs_and_seeds_shuffle_differently():
    layout = Layout(((50, 50), (50,), (50, 50)))
    base = epoch_order(layout, seed=0, epoch=0, shuffle=True, buffer_rows=100)
    assert not np.array_equal(
        base, epoch_order(layout, seed=0, epoch=1, shuffle=True, buffer_rows=100)
    )
    assert not np.array_equal(
        base, epoch_order(layout, seed=1, epoch=0, shuffle=True, buffer_rows=100)
    )
    plain = epoch_order(layout, seed=0, epoch=0, shuffle=False, buffer_rows=100)
    np.testing.assert_array_equal(plain, np.arange(250))


def test_bounded_buffer_keeps_rows_near_their_window():
    layout = Layout(tuple((10,) * 10 for _ in range(1)))
    order = epoch_order(layout, seed=3, epoch=0, shuffle=True, buffer_rows=20)
    # Windows of two blocks: each run of 20 positions holds exactly two whole blocks.
    for start in range(0, 100, 20):
        blocks = set((order[start : start + 20] // 10).tolist())
        assert len(blocks) == 2


def test_unknown_remainder_is_a_data_error():
    with pytest.raises(DataError, match=r"remainder"):
        plan_epoch(
            np.arange(10),
            samples_done=0,
            global_batch_size=2,
            world_size=1,
            grad_accum_steps=1,
            remainder="wrap",
        )
