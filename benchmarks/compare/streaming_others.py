"""(d) of `benchmarks/streaming.py`: LitData and MosaicML Streaming on the same samples.

Runs inside a separate virtual environment that has `litdata`, `mosaicml-streaming`, `torch`,
`numpy` and `pyarrow` (never roundhouse's own .venv; they are not roundhouse dependencies):

    python3 -m venv /tmp/benchvenv
    /tmp/benchvenv/bin/pip install litdata mosaicml-streaming torch pyarrow
    python benchmarks/streaming.py --compare-venv /tmp/benchvenv

`benchmarks/streaming.py` starts this script with that venv's interpreter (it lives in a
subfolder so that `make bench`, which runs `benchmarks/*.py`, does not start it bare, and so
that `benchmarks/streaming.py` does not shadow MosaicML's `streaming` package):

    python streaming_others.py PARQUET_DIR WORK_DIR --batch 256 --repeats 3 --workers 0

It converts the `train-*.parquet` shards of a prepared dataset to each library's own format
(raw uint8 bytes plus the label, uncompressed, 64 MB chunks, as the Parquet shards), then times
one shuffled epoch through each library's loader, ending at the same float32 tensors in [0, 1]
that roundhouse yields. It prints one JSON line: `{"litdata": samples/s, "mosaic": samples/s}`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

logger = logging.getLogger("benchmarks.streaming_others")
SHAPE = (3, 64, 64)


def samples(parquet_dir: Path) -> Iterator[tuple[bytes, int]]:
    """(raw image bytes, label) of every training row, in storage order."""
    for path in sorted(parquet_dir.glob("train-*.parquet")):
        table = pq.read_table(path)
        for image, label in zip(
            table.column("input").to_pylist(), table.column("target").to_pylist(), strict=True
        ):
            yield image, int(label)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """As roundhouse's decode (`codec.unit_float`): one buffered numpy pass."""
    out = np.empty(tuple(images.shape), dtype=np.float32)
    np.divide(images.numpy(), np.float32(255.0), out=out, dtype=np.float32)
    return torch.from_numpy(out)


# --- LitData -----------------------------------------------------------------------------------


def _lit_sample(item: tuple[bytes, int]) -> dict:
    image, label = item
    return {"x": np.frombuffer(image, dtype=np.uint8).reshape(SHAPE), "y": label}


def convert_litdata(parquet_dir: Path, out: Path) -> str:
    import litdata

    items = list(samples(parquet_dir))
    litdata.optimize(
        fn=_lit_sample,
        inputs=items,
        output_dir=str(out),
        chunk_bytes="64MB",
        num_workers=1,
        verbose=False,
    )
    return str(out)


def read_litdata(url: str, batch: int, workers: int) -> int:
    import litdata

    dataset = litdata.StreamingDataset(url, shuffle=True, seed=0)
    loader = litdata.StreamingDataLoader(dataset, batch_size=batch, num_workers=workers)
    rows = 0
    for item in loader:
        rows += to_float(item["x"]).shape[0] + 0 * item["y"].shape[0]
    return rows


# --- MosaicML Streaming -------------------------------------------------------------------------


def convert_mosaic(parquet_dir: Path, out: Path) -> str:
    from streaming import MDSWriter

    with MDSWriter(out=str(out), columns={"x": "bytes", "y": "int"}, size_limit="64mb") as writer:
        for image, label in samples(parquet_dir):
            writer.write({"x": image, "y": label})
    return str(out)


def _mosaic_collate(items: list[dict]) -> dict:
    images = np.stack([np.frombuffer(i["x"], dtype=np.uint8) for i in items]).reshape(-1, *SHAPE)
    return {"x": torch.from_numpy(images), "y": torch.tensor([i["y"] for i in items])}


def read_mosaic(url: str, batch: int, workers: int) -> int:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(local=url, batch_size=batch, shuffle=True, shuffle_seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, collate_fn=_mosaic_collate
    )
    rows = 0
    for item in loader:
        rows += to_float(item["x"]).shape[0]
    return rows


def timed(fn: Callable[[], int], repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = fn()
        rates.append(rows / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("parquet_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    lit = convert_litdata(args.parquet_dir, args.work_dir / "litdata")
    mds = convert_mosaic(args.parquet_dir, args.work_dir / "mds")
    result = {
        "litdata": timed(lambda: read_litdata(lit, args.batch, args.workers), args.repeats),
        "mosaic": timed(lambda: read_mosaic(mds, args.batch, args.workers), args.repeats),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
