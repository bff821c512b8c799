"""StepLoader batch arithmetic, resume, mixup and the evaluation loader."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roundhouse.config import AugmentConfig
from roundhouse.data import ArrayDataset, StepLoader, build_eval_loader
from roundhouse.data.sampler import epoch_order
from roundhouse.errors import DataError


def indexed_dataset(num_samples: int) -> ArrayDataset:
    """Sample i has input value i and target i, so batches show which indices they hold."""
    values = torch.arange(num_samples)
    return ArrayDataset(values.float().reshape(-1, 1, 1, 1), values.clone())


def make_loader(dataset, world_size=1, rank=0, accum=1, batch=8, **kwargs) -> StepLoader:
    options = {"seed": 7, "shuffle": True, "drop_last": False} | kwargs
    return StepLoader(
        dataset,
        global_batch_size=batch,
        rank=rank,
        world_size=world_size,
        grad_accum_steps=accum,
        **options,
    )


def rank_steps(dataset, world_size, accum, **kwargs) -> list[list[list[dict]]]:
    """Per step, per rank, the micro-batches that rank yields."""
    per_rank = [
        list(make_loader(dataset, world_size, rank, accum, **kwargs)) for rank in range(world_size)
    ]
    return [list(step) for step in zip(*per_rank, strict=True)]


def union_targets(step: list[list[dict]]) -> list[int]:
    """Concatenation in (rank, micro) order."""
    return [t for rank in step for micro in rank for t in micro["target"].tolist()]


@settings(max_examples=60, deadline=None)
@given(
    num_samples=st.integers(1, 50),
    batch=st.integers(1, 16),
    world_size=st.integers(1, 4),
    accum=st.integers(1, 3),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
)
def test_ranks_partition_every_global_batch(
    num_samples, batch, world_size, accum, drop_last, shuffle
):
    dataset = indexed_dataset(num_samples)
    kwargs = {"batch": batch, "drop_last": drop_last, "shuffle": shuffle}
    full, remainder = divmod(num_samples, batch)
    expected_steps = full + (not drop_last and remainder >= world_size * accum)
    if batch < world_size * accum or expected_steps == 0:
        with pytest.raises(DataError):
            make_loader(dataset, world_size, 0, accum, **kwargs)
        return
    order = epoch_order(num_samples, seed=7, epoch=0, shuffle=shuffle).tolist()
    steps = rank_steps(dataset, world_size, accum, **kwargs)
    assert len(steps) == expected_steps == len(make_loader(dataset, world_size, 0, accum, **kwargs))
    for i, step in enumerate(steps):
        assert union_targets(step) == order[i * batch : (i + 1) * batch]
        sizes = [len(micro["target"]) for rank in step for micro in rank]
        assert len(sizes) == world_size * accum and min(sizes) >= 1
        assert max(sizes) - min(sizes) <= 1


def test_union_over_ranks_equals_single_rank_batches():
    dataset = indexed_dataset(103)
    single = [step[0]["target"].tolist() for step in make_loader(dataset, batch=12)]
    for world_size in range(1, 5):
        for accum in range(1, 4):
            steps = rank_steps(dataset, world_size, accum, batch=12)
            assert [union_targets(step) for step in steps] == single[: len(steps)]


@pytest.mark.parametrize(
    ("world_size", "accum", "drop_last", "steps", "last"),
    [(2, 1, False, 3, 2), (3, 1, False, 2, 4), (2, 1, True, 2, 4), (1, 2, False, 3, 2)],
)
def test_remainder_policy(world_size, accum, drop_last, steps, last):
    loader = make_loader(indexed_dataset(10), world_size, 0, accum, batch=4, drop_last=drop_last)
    assert len(loader) == steps
    assert len(list(loader)) == steps
    assert loader.last_step_size == last


def test_batch_smaller_than_ranks_times_accum_names_both():
    with pytest.raises(DataError, match=r"global batch size 5 .* 3 \* 2"):
        make_loader(indexed_dataset(20), world_size=3, accum=2, batch=5)


def test_no_step_and_bad_rank_are_errors():
    with pytest.raises(DataError, match="no step"):
        make_loader(indexed_dataset(5), batch=8, drop_last=True)
    with pytest.raises(DataError, match="rank 2"):
        make_loader(indexed_dataset(20), world_size=2, rank=2)


def test_epochs_reshuffle_and_unshuffled_is_identity():
    loader = make_loader(indexed_dataset(32))
    first = [t for step in loader for t in step[0]["target"].tolist()]
    loader.set_epoch(1)
    second = [t for step in loader for t in step[0]["target"].tolist()]
    assert sorted(first) == sorted(second) == list(range(32)) and first != second
    plain = make_loader(indexed_dataset(32), shuffle=False)
    assert [t for step in plain for t in step[0]["target"].tolist()] == list(range(32))


def _save_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("resume_world_size", [1, 2, 3])
def test_resume_mid_epoch_yields_exactly_the_rest(resume_world_size):
    dataset = indexed_dataset(70)
    loader = make_loader(dataset, world_size=2, accum=2, batch=8)
    loader.set_epoch(3)
    reference = make_loader(dataset, batch=8)
    reference.set_epoch(3)
    expected = [step[0]["target"].tolist() for step in reference]
    for done, _ in enumerate(loader, start=1):
        if done == 4:
            break
    state = _save_load(loader.state_dict())
    assert state == {"epoch": 3, "steps_done": 4}
    resumed = [
        make_loader(dataset, resume_world_size, r, 1, batch=8) for r in range(resume_world_size)
    ]
    for rank_loader in resumed:
        rank_loader.load_state_dict(state)
        rank_loader.set_epoch(3)  # the restored epoch keeps the restored position
    steps = [list(s) for s in zip(*resumed, strict=True)]
    assert [union_targets(step) for step in steps] == expected[4:]
    assert resumed[0].state_dict() == {"epoch": 3, "steps_done": len(expected)}
    resumed[0].set_epoch(4)
    assert len(list(resumed[0])) == len(resumed[0]) == len(expected)


def test_iterating_again_restarts_the_epoch():
    loader = make_loader(indexed_dataset(30))
    loader.load_state_dict({"epoch": 0, "steps_done": 2})
    assert len(list(loader)) == len(loader) - 2
    assert len(list(loader)) == len(loader)


def test_bad_state_is_an_error():
    loader = make_loader(indexed_dataset(30))
    with pytest.raises(DataError):
        loader.load_state_dict({"epoch": 0})


def test_mixup_keys_range_and_parity():
    dataset = indexed_dataset(40)
    single = list(make_loader(dataset, batch=10, mixup_alpha=0.4))
    lams = set()
    for step in single:
        micro = step[0]
        assert set(micro) == {"input", "target", "target_b", "mix_lam"}
        lam = micro["mix_lam"]
        assert lam.dim() == 0 and lam.dtype == torch.float32 and 0 <= lam <= 1
        assert micro["target_b"].dtype == torch.int64
        assert sorted(micro["target_b"].tolist()) == sorted(micro["target"].tolist())
        mixed = lam * micro["target"].float() + (1 - lam) * micro["target_b"].float()
        assert torch.allclose(micro["input"].flatten(), mixed)
        lams.add(round(float(lam), 6))
    assert len(lams) > 1
    sharded = rank_steps(dataset, 2, 2, batch=10, mixup_alpha=0.4)
    for whole, parts in zip(single, sharded, strict=True):
        for key in ("input", "target", "target_b"):
            joined = torch.cat([micro[key] for rank in parts for micro in rank])
            assert torch.equal(joined, whole[0][key])


def test_mixup_alpha_comes_from_augment_config():
    loader = make_loader(indexed_dataset(20), augment=AugmentConfig(mixup_alpha=1.0))
    assert "mix_lam" in next(iter(loader))[0]
    assert "mix_lam" not in next(iter(make_loader(indexed_dataset(20))))[0]


def test_workers_give_the_same_batches():
    dataset = ArrayDataset(torch.rand(48, 3, 6, 6), torch.arange(48))
    augment = AugmentConfig(hflip=0.5, gaussian_noise=0.1, random_erasing=0.5, mixup_alpha=0.3)
    kwargs = {"batch": 12, "accum": 2, "augment": augment}
    inline = list(make_loader(dataset, **kwargs))
    pooled = make_loader(dataset, num_workers=2, **kwargs)
    pooled.load_state_dict({"epoch": 0, "steps_done": 1})
    workers = list(pooled)
    assert len(workers) == len(inline) - 1
    for a, b in zip(inline[1:], workers, strict=True):
        for micro_a, micro_b in zip(a, b, strict=True):
            assert micro_a.keys() == micro_b.keys()
            assert all(torch.equal(micro_a[k], micro_b[k]) for k in micro_a)


@pytest.mark.parametrize("num_samples", [0, 2, 25])
def test_eval_loader_covers_each_sample_once(num_samples):
    dataset = indexed_dataset(num_samples)
    for world_size in range(1, 4):
        seen = []
        for rank in range(world_size):
            loader = build_eval_loader(dataset, batch_size=4, rank=rank, world_size=world_size)
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(1 <= len(b["target"]) <= 4 for b in batches)
            seen += [t for b in batches for t in b["target"].tolist()]
        assert seen == list(range(num_samples))


def shared_counter():
    """A claim function over one `ShardServer` (the counter the `ps` strategy's loaders share)."""
    from roundhouse.parallel.ps.server import ServerSetup, ShardServer

    server = ShardServer()
    setup = ServerSetup("async", 0, 2, 2, torch.optim.SGD, lambda opt: None)
    server.initialize(setup, [], [])
    return server.claim


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dynamic_assignment_gives_every_chunk_to_exactly_one_rank(num_workers):
    """Two ranks claim from one counter, rank 0 three times as often: together they train on
    exactly the static assignment's micro-batches, and rank 0 on most of them."""
    dataset = indexed_dataset(45)
    claim = shared_counter()
    loaders = [make_loader(dataset, 2, r, 2, batch=8, num_workers=num_workers) for r in (0, 1)]
    dynamic = [
        make_loader(dataset, 2, r, 2, batch=8, num_workers=num_workers, claim=claim) for r in (0, 1)
    ]
    static = sorted(
        tuple(micro["target"].tolist()) for loader in loaders for step in loader for micro in step
    )
    iterators, taken = [iter(d) for d in dynamic], {0: [], 1: []}
    live = {0, 1}
    while live:
        for rank, turns in ((0, 3), (1, 1)):
            for _ in range(turns if rank in live else 0):
                try:
                    taken[rank].append(next(iterators[rank]))
                except StopIteration:
                    live.discard(rank)
                    break
    ours = sorted(tuple(m["target"].tolist()) for r in taken for step in taken[r] for m in step)
    assert ours == static
    # DataLoader workers claim ahead by their prefetch depth (about two chunks here).
    assert len(taken[0]) > (2 if num_workers == 0 else 1) * len(taken[1])
    assert all(d.state_dict() == {"epoch": 0, "steps_done": len(d)} for d in dynamic)
    assert {d.last_step_size for d in dynamic} <= {8, 5}  # the global step size, as in static


def test_dynamic_assignment_resumes_at_the_saved_step():
    dataset = indexed_dataset(64)
    claim = shared_counter()
    loader = make_loader(dataset, 2, 0, 1, batch=8, claim=claim)
    loader.load_state_dict({"epoch": 0, "steps_done": 6})
    steps = list(loader)
    order = epoch_order(64, seed=7, epoch=0, shuffle=True).tolist()
    assert [t for step in steps for t in step[0]["target"].tolist()] == order[48:]


@pytest.mark.parametrize("mixup_alpha", [0.0, 0.4])
def test_taking_over_lost_shares_splits_them_among_the_survivors(mixup_alpha):
    """Live recovery: ranks 1 and 3 of 4 are lost at step 2. The 2 survivors' next step is
    each one's part of the lost shares (mixup partners as drawn for the whole step), cut into
    micro-batches no larger than before; then the steps go on at 2 ranks."""
    dataset, options = indexed_dataset(60), {"batch": 12, "mixup_alpha": mixup_alpha}
    before = rank_steps(dataset, 4, 2, **options)  # per step, per rank: 2 micro-batches of 1-2
    lost = [micro for rank in (1, 3) for micro in before[2][rank]]
    taken = []
    for rank in range(2):
        loader = make_loader(dataset, 2, rank, 2, **options)
        loader.load_state_dict({"epoch": 0, "steps_done": 2})
        kept = [t for micro in before[2][rank * 2] for t in micro["target"].tolist()]
        assert loader.take_over(2, [3, 1], 4, kept)
        steps = list(loader)
        assert loader.last_step == len(loader) - 1
        taken.append(steps[0])
        first = make_loader(dataset, 2, rank, 2, **options)
        first.load_state_dict({"epoch": 0, "steps_done": 3})
        assert [m["target"].tolist() for s in steps[1:] for m in s] == [
            m["target"].tolist() for s in first for m in s
        ]
    for key in ("input", "target", *(("target_b",) if mixup_alpha else ())):
        joined = torch.cat([micro[key] for rank in taken for micro in rank])
        assert torch.equal(joined, torch.cat([micro[key] for micro in lost]))
    assert max(len(m["target"]) for rank in taken for m in rank) <= 2
    loader = make_loader(dataset, 2, 0, 2, **options)
    loader.load_state_dict({"epoch": 0, "steps_done": 2})
    kept = before[2][0][0]["target"].tolist() + before[2][0][1]["target"].tolist()
    assert loader.take_over(2, [1, 3], 4, kept)
    next(iter(loader))
    assert loader.last_indices[: len(kept)] == kept  # the ledger records the kept share too


def test_taking_over_needs_static_shares_and_a_sample_per_survivor():
    dataset = indexed_dataset(60)
    assert not make_loader(dataset, 2, 0, 1, batch=12, virtual_shards=4).take_over(0, [1], 3, [])
    claims = make_loader(dataset, 2, 0, 1, batch=12, claim=lambda epoch, first, limit: -1)
    assert not claims.take_over(0, [1], 3, [])
    # a global batch of 4 at 3 ranks: shares of 2, 1 and 1 samples
    assert not make_loader(dataset, 2, 0, 1, batch=4).take_over(0, [2], 3, [])
    assert make_loader(dataset, 2, 0, 1, batch=4).take_over(0, [0], 3, [])
