"""StreamingDataset on local and in-memory storage: epochs, resume, elastic, workers, cache."""

from __future__ import annotations

import itertools
from pathlib import Path

import fsspec
import numpy as np
import pytest

from roundhouse.data.streaming import (
    PrepareOptions,
    StreamConfig,
    StreamingDataset,
    StreamingLoader,
    WriteConfig,
    prepare,
)
from roundhouse.errors import DataError

NUM_ROWS = 1000


@pytest.fixture(scope="module")
def ids_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A dataset whose input is the sample's own id, so tests can see which rows they got."""
    folder = tmp_path_factory.mktemp("ids")
    source = folder / "ids.npz"
    ids = np.arange(NUM_ROWS, dtype=np.float32)[:, None]
    np.savez(source, x=ids, y=np.arange(NUM_ROWS) % 7)
    url = str(folder / "dataset")
    prepare(
        str(source),
        url,
        PrepareOptions(shuffle=False),
        WriteConfig(shard_bytes=1500, block_rows=40, codec="none"),
    )
    return url


def _loader(url: str, *, rank=0, world=1, accum=1, workers=0, batch=48, **extra):
    config = StreamConfig(
        global_batch_size=batch,
        rank=rank,
        world_size=world,
        grad_accum_steps=accum,
        seed=5,
        buffer_rows=120,
        **extra,
    )
    return StreamingLoader(StreamingDataset(url, config), num_workers=workers)


def _ids(step) -> list[int]:
    return [int(v) for micro in step for v in micro["input"][:, 0].tolist()]


def _global_steps(url, world, *, state=None, stop=None, **kw):
    """Per-step sorted ids over all ranks; optionally from a saved state, up to `stop` steps."""
    loaders = [_loader(url, rank=r, world=world, **kw) for r in range(world)]
    steps = []
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
        # islice stops before pulling step `stop`, as a killed run never saw it.
        for k, step in enumerate(itertools.islice(loader, stop)):
            if len(steps) <= k:
                steps.append([])
            steps[k].extend(_ids(step))
    return [sorted(s) for s in steps], loaders[0].state_dict()


def test_one_epoch_yields_every_sample_once_with_targets(ids_url):
    loader = _loader(ids_url, batch=50)
    ids, targets = [], []
    for step in loader:
        ids += _ids(step)
        targets += step[0]["target"].tolist()
    assert sorted(ids) == list(range(NUM_ROWS))
    assert targets == [i % 7 for i in ids]
    assert len(loader) == 20 and loader.state_dict()["steps_done"] == 20
    assert ids != sorted(ids)  # shuffled


def test_micro_batch_structure_matches_step_loader(ids_url):
    step = next(iter(_loader(ids_url, rank=1, world=2, accum=3, batch=48)))
    assert len(step) == 3
    assert [m["input"].shape[0] for m in step] == [8, 8, 8]
    assert step[0]["target"].dtype.is_floating_point is False


def test_kill_and_resume_equals_one_uninterrupted_epoch(ids_url):
    whole, _ = _global_steps(ids_url, 1)
    first, state = _global_steps(ids_url, 1, stop=7)
    rest, _ = _global_steps(ids_url, 1, state=state)
    assert state["steps_done"] == 7 and state["samples_done"] == 7 * 48
    assert first + rest == whole


def test_elastic_resume_from_two_ranks_to_three(ids_url):
    whole, _ = _global_steps(ids_url, 1, accum=1)
    first, state = _global_steps(ids_url, 2, stop=9)
    rest, _ = _global_steps(ids_url, 3, state=state)
    assert first + rest == whole
    seen = [i for s in first + rest for i in s]
    assert len(seen) == len(set(seen))


def test_loader_workers_do_not_change_the_output(ids_url):
    plain = [_ids(s) for s in _loader(ids_url, rank=1, world=2)]
    workers = _loader(ids_url, rank=1, world=2, workers=2)
    assert [_ids(s) for s in workers] == plain
    assert workers.state_dict()["steps_done"] == len(plain)


def test_remainder_policies(ids_url):
    for remainder, count in (("drop", 960), ("partial", 1000), ("pad", 1008)):
        ids = [i for s in _loader(ids_url, batch=48, remainder=remainder) for i in _ids(s)]
        assert len(ids) == count and set(ids) <= set(range(NUM_ROWS))
    assert len(set(ids)) == NUM_ROWS


def test_batches_keep_their_values_while_later_steps_are_read(ids_url):
    """The reader reuses one gather buffer; the batches it hands out must not alias it."""
    steps = list(_loader(ids_url, batch=50))  # every batch held until the epoch ends
    assert sorted(i for step in steps for i in _ids(step)) == list(range(NUM_ROWS))


def test_a_shuffled_epoch_reads_every_block_once(ids_url):
    """Steps crossing from one shuffle window into the next must not evict blocks still needed."""
    loader = _loader(ids_url, batch=50)
    reader = loader.dataset.reader
    reads: list[int] = []
    mapped = reader._mapped_block

    def counting(shard, file, group, rows):
        reads.append(int(reader.first_block[shard]) + group)
        return mapped(shard, file, group, rows)

    reader._mapped_block = counting
    assert sum(len(_ids(step)) for step in loader) == NUM_ROWS
    assert sorted(reads) == list(range(NUM_ROWS // 40))  # 40-row blocks, each read once


def test_info_and_schema_checks(ids_url):
    dataset = StreamingDataset(ids_url, StreamConfig(global_batch_size=10))
    assert dataset.info.input_shape == (1,) and dataset.info.num_classes == 7
    dataset.check_fits((1,), 10)
    with pytest.raises(DataError, match=r"field 'input'.*shape"):
        dataset.check_fits((3, 32, 32), 10)
    with pytest.raises(DataError, match=r"field 'target'.*7 classes"):
        dataset.check_fits((1,), 5)


def test_missing_index_and_split(tmp_path, ids_url):
    with pytest.raises(DataError, match=r"index not found"):
        StreamingDataset(str(tmp_path), StreamConfig())
    with pytest.raises(DataError, match=r"no split 'val'"):
        StreamingDataset(ids_url, StreamConfig(split="val"))


def _copy(url: str, dest: Path) -> str:
    dest.mkdir()
    for path in Path(url).iterdir():
        (dest / path.name).write_bytes(path.read_bytes())
    return str(dest)


def test_missing_and_corrupt_shards(tmp_path, ids_url):
    url = _copy(ids_url, tmp_path / "copy")
    (Path(url) / "train-00002.parquet").unlink()
    with pytest.raises(DataError, match=r"shard train-00002.parquet not found"):
        list(_loader(url))
    url = _copy(ids_url, tmp_path / "corrupt")
    target = Path(url) / "train-00001.parquet"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard train-00001.parquet .* corrupt"):
        list(_loader(url))
    loader = _loader(url, on_corrupt="skip", remainder="partial")
    ids = [i for s in loader for i in _ids(s)]
    assert loader.metrics() == {"data/corrupt_shards_skipped": 1.0}
    # Rows are stored in id order (prepared without shuffle): shard 1 holds ids 120..239; its
    # rows are replaced by shard 2's (ids 240..359), so every step keeps its planned size.
    assert len(ids) == NUM_ROWS
    assert set(range(NUM_ROWS)) - set(ids) == set(range(120, 240))
    seen_twice = {i for i in ids if ids.count(i) == 2}
    assert seen_twice == set(range(240, 360))
    workers = _loader(url, on_corrupt="skip", remainder="partial", workers=2)
    assert sorted(i for s in workers for i in _ids(s)) == sorted(ids)
    assert workers.metrics() == {"data/corrupt_shards_skipped": 1.0}  # counted in the workers


def test_remote_cache_downloads_once_and_evicts(tmp_path, ids_url):
    fs = fsspec.filesystem("memory")
    for path in Path(ids_url).iterdir():
        fs.pipe_file(f"/ids/{path.name}", path.read_bytes())
    cache = tmp_path / "cache"
    loader = _loader("memory://ids", cache_dir=str(cache), cache_limit_bytes=1 << 30)
    first = [_ids(s) for s in loader]
    downloads = loader.dataset.reader.cache.downloads
    assert downloads == len(loader.dataset.shards)
    assert [_ids(s) for s in loader] == first
    assert loader.dataset.reader.cache.downloads == downloads  # cached: nothing downloaded again
    small = _loader("memory://ids", cache_dir=str(tmp_path / "small"), cache_limit_bytes=4000)
    assert sorted(i for s in small for i in _ids(s)) == list(range(NUM_ROWS))
    kept = sum(p.stat().st_size for p in (tmp_path / "small").glob("*.parquet"))
    largest = max(s.bytes for s in small.dataset.shards)
    # The limit holds except for the shards pinned for reading and prefetch (3 here).
    assert kept <= 3 * largest < sum(s.bytes for s in small.dataset.shards)


def test_unwritable_cache_dir(tmp_path, ids_url):
    fs = fsspec.filesystem("memory")
    for path in Path(ids_url).iterdir():
        fs.pipe_file(f"/ro/{path.name}", path.read_bytes())
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(DataError, match=r"cache directory .* is not writable"):
        StreamingDataset("memory://ro", StreamConfig(cache_dir=str(blocked / "cache")))
