"""Streaming read throughput: raw pyarrow vs roundhouse local vs S3 (moto) vs LitData/Mosaic.

    python benchmarks/streaming.py --size-mb 1024 [--repeats 3] [--workers 0]
        [--compare-venv /tmp/benchvenv]

Data: synthetic 3x64x64 uint8 images with labels, prepared once with `data prepare` (64 MB
shards, uncompressed). Every reader ends at the same float32 tensors in [0, 1], so the figures
compare like with like:

(a) raw pyarrow: the shards read sequentially, row group by row group (the reference);
(b) roundhouse local: one shuffled epoch through `StreamingLoader`;
(c) roundhouse through an S3 server on loopback (moto, in its own process), cold cache;
    next to it, (c0) the server's own limit: the same shards fetched with plain s3fs GETs
    (as many in parallel as roundhouse's prefetch threads), nothing decoded, in samples/s;
(d) LitData and MosaicML Streaming on the same samples converted to their formats, run by
    `compare/streaming_others.py` inside `--compare-venv` (a separate venv with `litdata`,
    `mosaicml-streaming`, `torch`, `pyarrow`; they are not roundhouse dependencies).

(a) and (b) alternate, repeat after repeat, and each figure is a median, so a noisy shared
machine moves both alike; the ratios are what to read. Samples per CPU-second (this process's
CPU time, all its threads) are printed too: they move less than wall-clock rates when other
work shares the machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
from roundhouse.data.streaming.codec import unit_float
from roundhouse.parallel.net import free_port

logger = logging.getLogger("benchmarks.streaming")
SHAPE = (3, 64, 64)
HERE = Path(__file__).resolve().parent


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
    (folder / "src.npz").unlink()
    return url


def raw_pyarrow(url: str) -> int:
    """(a) Sequential read of the same files with pyarrow, decoded to float tensors by the same
    function as roundhouse's, straight from pyarrow's buffer (no copy of its own)."""
    rows = 0
    for path in sorted(Path(url).glob("train-*.parquet")):
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            table = file.read_row_group(group)
            column = table.column("input").combine_chunks()
            data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
            images = unit_float(data.reshape(-1, *SHAPE))
            labels = torch.from_numpy(table.column("target").to_numpy().astype(np.int64))
            rows += images.shape[0] + 0 * labels.shape[0]
    return rows


def roundhouse(url: str, batch: int, workers: int, cache: str, options=None) -> int:
    """(b), (c): one shuffled epoch of one rank through `StreamingLoader`."""
    config = StreamConfig(global_batch_size=batch, cache_dir=cache)
    loader = StreamingLoader(StreamingDataset(url, config, options), num_workers=workers)
    return sum(m["input"].shape[0] + 0 * m["target"].shape[0] for step in loader for m in step)


def raw_get(remote: str, options: dict, threads: int) -> int:
    """(c0) Every training shard of `remote` fetched whole with s3fs, `threads` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import s3fs

    fs = s3fs.S3FileSystem(**options)
    index = json.loads(fs.cat_file(f"{remote}/index.json"))
    shards = [s for s in index["shards"] if s.get("split", "train") == "train"]
    with ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda s: len(fs.cat_file(f"{remote}/{s['name']}")), shards))
    assert sum(sizes) == sum(s["bytes"] for s in shards)
    return sum(s["rows"] for s in shards)


def measure(fn: Callable[[], int]) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = fn()
    return rows / (time.perf_counter() - wall), rows / max(time.process_time() - cpu, 1e-9)


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def start_s3(url: str) -> tuple[subprocess.Popen, dict]:
    """A moto S3 server in its own process (sharing this one's GIL would slow the reader)."""
    import requests
    import s3fs

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            requests.get(endpoint, timeout=1)
            break
        except requests.ConnectionError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)
    options = {"endpoint_url": endpoint, "key": "bench", "secret": "bench"}
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bench-data")
    fs.put(f"{url}/", "bench-data/ds/", recursive=True)
    return server, options


def run_others(venv: str, url: str, work: Path, args: argparse.Namespace) -> dict[str, float]:
    """(d) in the comparison venv; {} when it is missing or fails (the reason is logged)."""
    python = Path(venv) / "bin" / "python"
    if not python.exists():
        logger.warning("no interpreter at %s: (d) skipped", python)
        return {}
    cmd = [str(python), str(HERE / "compare" / "streaming_others.py"), url, str(work)]
    cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
    cmd += ["--workers", str(args.workers)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
    if done.returncode != 0:
        logger.warning("streaming_others.py failed: %s", done.stderr.strip()[-2000:])
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def result(name: str, ours: float, baseline: float, unit: str) -> str:
    return (
        f"RESULT {name} ours={ours:.1f} baseline={baseline:.1f} ratio={ours / baseline:.3f} "
        f"unit={unit}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--compare-venv", help="venv with litdata and mosaicml-streaming")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = make_dataset(folder, args.size_mb)
        local = str(folder / "c")  # local datasets keep only verification markers here
        raw, ours = [], []
        for _ in range(args.repeats):
            raw.append(measure(lambda: raw_pyarrow(url)))
            ours.append(measure(lambda: roundhouse(url, args.batch, args.workers, local)))
        others = run_others(args.compare_venv, url, folder, args) if args.compare_venv else {}
        if others:  # (b) again, next to (d) in time
            ours += [measure(lambda: roundhouse(url, args.batch, args.workers, local))]
        a, b = medians(raw), medians(ours)
        server, options = start_s3(url)
        try:
            remote = "s3://bench-data/ds"
            cold, gets = [], []
            threads = StreamConfig(global_batch_size=1).prefetch_shards
            for k in range(args.repeats):  # a new cache folder each time: every shard is fetched
                cache = str(folder / f"s3-cache-{k}")
                read = functools.partial(
                    roundhouse, remote, args.batch, args.workers, cache, options
                )
                cold.append(measure(read))
                gets.append(measure(lambda: raw_get(remote, options, threads)))
        finally:
            server.kill()
            server.wait()
        c, c0 = medians(cold), medians(gets)
    print(
        f"dataset {args.size_mb} MB of {SHAPE} uint8 images, batch {args.batch}, "
        f"workers {args.workers}, median of {args.repeats}; samples/s (samples per CPU-s)"
    )
    print(
        f"(a) raw pyarrow {a[0]:,.0f} ({a[1]:,.0f})  (b) roundhouse local {b[0]:,.0f} "
        f"({b[1]:,.0f})  (c) roundhouse S3 cold cache {c[0]:,.0f}  (c0) plain S3 GETs "
        f"{c0[0]:,.0f}"
    )
    print("per repeat, samples/s: (a) " + ", ".join(f"{r:,.0f}" for r, _ in raw))
    print("                       (b) " + ", ".join(f"{r:,.0f}" for r, _ in ours))
    print(result("streaming_local_vs_pyarrow", b[0], a[0], "samples/s"))
    print(result("streaming_local_vs_pyarrow_cpu", b[1], a[1], "samples/cpu_s"))
    print(result("streaming_s3_cold_vs_local", c[0], b[0], "samples/s"))
    print(result("streaming_s3_cold_vs_plain_get", c[0], c0[0], "samples/s"))
    if others:
        best = max(others, key=others.get)
        print(f"(d) LitData {others['litdata']:,.0f}  MosaicML Streaming {others['mosaic']:,.0f}")
        print(result(f"streaming_local_vs_{best}", b[0], others[best], "samples/s"))
    else:
        print("(d) LitData / MosaicML Streaming: not run (pass --compare-venv VENV)")


if __name__ == "__main__":
    main()
