"""Streaming datasets through a real S3-compatible server (moto) on loopback, via s3fs."""

from __future__ import annotations

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
from roundhouse.parallel.net import free_port

BUCKET = "rh-data"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server and the storage options that reach it, with a digits dataset in it."""
    from moto.server import ThreadedMotoServer

    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ACCESS_KEY_ID", "testing")
    patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    import s3fs

    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(BUCKET)
    prepare(
        "builtin:digits",
        f"s3://{BUCKET}/digits",
        PrepareOptions(),
        WriteConfig(shard_bytes=60_000, block_rows=64),
        storage_options=options,
    )
    yield options
    server.stop()
    patch.undo()


def _ids(loader) -> list[list[float]]:
    return [m["input"].sum(dim=(1, 2, 3)).tolist() for step in loader for m in step]


def test_s3_stream_equals_local_stream(s3, tmp_path):
    local = str(tmp_path / "digits")
    prepare(
        "builtin:digits", local, PrepareOptions(), WriteConfig(shard_bytes=60_000, block_rows=64)
    )
    config = StreamConfig(global_batch_size=64, cache_dir=str(tmp_path / "cache"), seed=3)
    remote = StreamingLoader(StreamingDataset(f"s3://{BUCKET}/digits", config, s3))
    assert _ids(remote) == _ids(StreamingLoader(StreamingDataset(local, config)))
    cache = remote.dataset.reader.cache
    assert cache.downloads == len(remote.dataset.shards)
    _ids(remote)  # second epoch: served from the cache
    assert cache.downloads == len(remote.dataset.shards)


def test_s3_elastic_resume_two_to_three_ranks(s3, tmp_path):
    def loaders(world):
        return [
            StreamingLoader(
                StreamingDataset(
                    f"s3://{BUCKET}/digits",
                    StreamConfig(
                        global_batch_size=60,
                        rank=r,
                        world_size=world,
                        cache_dir=str(tmp_path / "c"),
                    ),
                    s3,
                ),
                num_workers=1 if r == 0 else 0,
            )
            for r in range(world)
        ]

    def steps(group, count=None, state=None):
        out = []
        for loader in group:
            if state:
                loader.load_state_dict(state)
            it = iter(loader)
            for k in range(
                count if count is not None else len(loader) - (state or {}).get("steps_done", 0)
            ):
                if len(out) <= k:
                    out.append([])
                out[k] += [
                    round(v, 4) for m in next(it) for v in m["input"].sum(dim=(1, 2, 3)).tolist()
                ]
        return [sorted(s) for s in out], group[0].state_dict()

    whole, _ = steps(loaders(1))
    first, state = steps(loaders(2), count=10)
    rest, _ = steps(loaders(3), state=state)
    assert first + rest == whole


def test_s3_bad_credentials(s3, tmp_path, monkeypatch):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    bad = {**s3, "key": "AKIAWRONGWRONGWRONG0", "secret": "nope", "skip_instance_cache": True}
    with pytest.raises(DataError, match=r"access denied to dataset index"):
        StreamingDataset(f"s3://{BUCKET}/digits", StreamConfig(cache_dir=str(tmp_path)), bad)


def test_s3_missing_and_corrupt_shard(s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    fs.copy(f"{BUCKET}/digits", f"{BUCKET}/broken", recursive=True)
    shard = sorted(p for p in fs.ls(f"{BUCKET}/broken") if p.endswith("train-00001.parquet"))[0]
    data = bytearray(fs.cat_file(shard))
    data[100] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    url = f"s3://{BUCKET}/broken"
    config = StreamConfig(global_batch_size=64, cache_dir=str(tmp_path / "a"))
    with pytest.raises(DataError, match=r"train-00001.parquet .* corrupt"):
        list(StreamingLoader(StreamingDataset(url, config, s3)))
    skip = StreamConfig(global_batch_size=64, cache_dir=str(tmp_path / "b"), on_corrupt="skip")
    loader = StreamingLoader(StreamingDataset(url, skip, s3))
    # The skipped shard's rows are replaced by the next shard's: every step keeps its size.
    assert sum(m["input"].shape[0] for step in loader for m in step) == 1438
    assert loader.dataset.corrupt_skipped == 1
    fs.rm_file(shard)
    with pytest.raises(DataError, match=r"shard train-00001.parquet not found"):
        list(
            StreamingLoader(StreamingDataset(url, StreamConfig(cache_dir=str(tmp_path / "c")), s3))
        )
    with pytest.raises(DataError, match=r"index not found"):
        StreamingDataset(f"s3://{BUCKET}/nothing", StreamConfig(cache_dir=str(tmp_path)), s3)


def test_training_job_streams_from_s3(s3, tmp_path):
    """A job file with data.train.url on S3: credentials from the environment, the endpoint in
    data.storage_options, shards cached locally; the same weights as the local copy."""
    import yaml

    from roundhouse.launch.cli import main
    from tests.helpers.runs import assert_same_weights, final_weights, only_run, read_metrics

    local = str(tmp_path / "digits")
    prepare(
        "builtin:digits", local, PrepareOptions(), WriteConfig(shard_bytes=60_000, block_rows=64)
    )
    job = {
        "name": "s3job",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {
            "train": {"url": f"s3://{BUCKET}/digits/"},
            "batch_size": 32,
            "storage_options": {"endpoint_url": s3["endpoint_url"]},
            "cache": {"dir": str(tmp_path / "cache"), "max_bytes": "1GB"},
        },
        "trainer": {"max_steps": 8, "log_every_steps": 4},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    remote, copy = tmp_path / "remote", tmp_path / "copy"
    assert main(["train", str(path), "--local", f"storage.path={remote}"]) == 0
    overrides = ["data.storage_options={}", f"data.train.url={local}", f"storage.path={copy}"]
    assert main(["train", str(path), "--local", *overrides]) == 0
    run = only_run(remote, "s3job")
    assert read_metrics(run)[-1]["step"] == 8 and "test/accuracy" in read_metrics(run)[-1]
    assert_same_weights(final_weights(run), final_weights(only_run(copy, "s3job")))
    cached = list((tmp_path / "cache").glob("*.parquet"))
    assert len(cached) >= 3  # train shards plus val and test
    assert "testing" not in (run / "job.yaml").read_text()
