"""Streaming read throughput: raw pyarrow vs roundhouse local vs roundhouse over S3 (moto).

    python benchmarks/streaming.py --size-mb 1024 [--repeats 3] [--workers 0]

Data: synthetic 3x64x64 uint8 images with labels, prepared once with `data prepare`. Every
reader ends at the same float32 tensors in [0, 1], so the figures compare like with like.
(d) LitData / MosaicML Streaming run only when those packages are importable; they are not
roundhouse dependencies (install them into a throwaway venv to compare).
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from roundhouse.data.streaming import (
    PrepareOptions,
    StreamConfig,
    StreamingDataset,
    StreamingLoader,
    WriteConfig,
    prepare,
)

logger = logging.getLogger("benchmarks.streaming")
SHAPE = (3, 64, 64)


def make_dataset(folder: Path, size_mb: int) -> str:
    count = max(1024, size_mb * (1 << 20) // int(np.prod(SHAPE)))
    rng = np.random.default_rng(0)
    np.savez(
        folder / "src.npz",
        x=rng.integers(0, 256, (count, *SHAPE), dtype=np.uint8),
        y=rng.integers(0, 10, count),
    )
    url = str(folder / "ds")
    prepare(str(folder / "src.npz"), url, PrepareOptions(), WriteConfig(codec="none"))
    return url


def raw_pyarrow(url: str, batch: int) -> int:
    """(a) Sequential read of the same files with pyarrow, same decode to float tensors."""
    rows = 0
    for path in sorted(Path(url).glob("train-*.parquet")):
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            table = file.read_row_group(group)
            column = table.column("input").combine_chunks()
            data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
            images = torch.from_numpy(data.copy()).view(-1, *SHAPE).float().div_(255.0)
            labels = torch.from_numpy(table.column("target").to_numpy())
            rows += images.shape[0] + 0 * labels.shape[0]
    return rows


def roundhouse(url: str, batch: int, workers: int, cache: str, options=None) -> int:
    config = StreamConfig(global_batch_size=batch, cache_dir=cache)
    loader = StreamingLoader(StreamingDataset(url, config, options), num_workers=workers)
    return sum(m["input"].shape[0] for step in loader for m in step)


def timed(fn, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = fn()
        rates.append(rows / (time.perf_counter() - start))
    return statistics.median(rates)


def start_s3(url: str) -> tuple[object, dict]:
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench-data")
    fs.put(f"{url}/", "bench-data/ds/", recursive=True)
    return server, options


def others_note() -> str:
    missing = []
    for module in ("litdata", "streaming"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    return ", ".join(missing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = make_dataset(folder, args.size_mb)
        a = timed(lambda: raw_pyarrow(url, args.batch), args.repeats)
        b = timed(
            lambda: roundhouse(url, args.batch, args.workers, str(folder / "c")), args.repeats
        )
        server, options = start_s3(url)
        try:
            counter = iter(range(1000))
            c = timed(
                lambda: roundhouse(
                    "s3://bench-data/ds",
                    args.batch,
                    args.workers,
                    str(folder / f"cold{next(counter)}"),
                    options,
                ),
                args.repeats,
            )
        finally:
            server.stop()
    print(
        f"dataset {args.size_mb} MB of {SHAPE} uint8 images, batch {args.batch}, "
        f"workers {args.workers}, median of {args.repeats}"
    )
    print(
        f"(a) raw pyarrow {a:,.0f}/s  (b) roundhouse local {b:,.0f}/s  "
        f"(c) roundhouse S3 cold cache {c:,.0f}/s"
    )
    print(
        "(d) LitData / MosaicML Streaming: not run; this script does not convert to their "
        f"formats yet (not importable here: {others_note() or 'none'})"
    )
    print(
        f"RESULT streaming_local_vs_pyarrow ours={b:.1f} baseline={a:.1f} ratio={b / a:.3f} "
        "unit=samples/s"
    )
    print(
        f"RESULT streaming_s3_cold_vs_local ours={c:.1f} baseline={b:.1f} ratio={c / b:.3f} "
        "unit=samples/s"
    )


if __name__ == "__main__":
    main()
