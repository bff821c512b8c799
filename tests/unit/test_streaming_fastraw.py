"""The zero-copy path for uncompressed raw shards reads exactly what pyarrow decodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from roundhouse.data.streaming import (
    PrepareOptions,
    StreamConfig,
    StreamingDataset,
    WriteConfig,
    prepare,
)
from roundhouse.data.streaming.codec import unit_float
from roundhouse.data.streaming.fastraw import map_file, plain_values


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_mapped_blocks_equal_decoded_blocks(tmp_path: Path, dtype: str):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (300, 3, 4, 4)).astype(dtype)
    np.savez(tmp_path / "src.npz", x=x, y=np.arange(300) % 5)
    batches = {}
    for codec in ("none", "zstd"):
        url = str(tmp_path / codec)
        prepare(
            str(tmp_path / "src.npz"),
            url,
            PrepareOptions(),
            WriteConfig(codec=codec, block_rows=32, shard_bytes=x[0].nbytes * 100),
        )
        dataset = StreamingDataset(url, StreamConfig(global_batch_size=1, cache_dir=str(tmp_path)))
        assert len(dataset.shards) >= 2  # one step gathers from several shards' maps
        rows = np.sort(np.random.default_rng(2).choice(300, 120, replace=False))
        batches[codec] = dataset.reader.read(rows)
        views = [v for v, _ in dataset.reader._blocks.values() if not v.flags.c_contiguous]
        assert (len(views) > 0) == (codec == "none")  # mapped only when uncompressed
        # uncompressed: every block of the step is gathered through its shard's mapped rows
        assert (set(dataset.reader._raw) == set(dataset.reader._blocks)) == (codec == "none")
    assert torch.equal(batches["none"]["input"], batches["zstd"]["input"])
    assert torch.equal(batches["none"]["target"], batches["zstd"]["target"])


def test_other_layouts_fall_back(tmp_path: Path):
    values = [bytes([k]) * 12 for k in range(100)]
    table = pa.table({"input": pa.array(values, pa.binary())})
    layouts = {
        "dictionary": {"use_dictionary": True},
        "pages": {"use_dictionary": False, "data_page_size": 200},  # several pages per block
        "compressed": {"use_dictionary": False, "compression": "zstd"},
        "plain": {"use_dictionary": False, "compression": "none"},
    }
    found = {}
    for name, options in layouts.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=100, **options)
        column = pq.ParquetFile(path).metadata.row_group(0).column(0)
        found[name] = plain_values(map_file(str(path)), column, 100, 12)
    assert [k for k, v in found.items() if v is not None] == ["plain"]
    assert found["plain"][7].tobytes() == bytes([7]) * 12


def test_unit_float_is_torch_float_division():
    images = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 3, 4, 4)
    expected = torch.from_numpy(images).float() / 255.0
    got = unit_float(images)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
