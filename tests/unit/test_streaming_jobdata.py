"""The `data.train` job-file schema and `StreamingSplits` (what the trainer gets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from roundhouse.config import DataConfig
from roundhouse.data import build_splits
from roundhouse.data.streaming import PrepareOptions, WriteConfig, prepare
from roundhouse.errors import DataError

NUM_ROWS = 300


@pytest.fixture(scope="module")
def ids_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Images whose every pixel is the sample id / 1000; train/val/test by a seeded hash."""
    folder = tmp_path_factory.mktemp("ids")
    ids = np.arange(NUM_ROWS, dtype=np.float32)
    images = np.broadcast_to(ids[:, None, None, None] / 1000, (NUM_ROWS, 1, 6, 6)).copy()
    np.savez(folder / "ids.npz", x=images, y=np.arange(NUM_ROWS) % 3)
    url = str(folder / "ds")
    options = PrepareOptions(shuffle=False, split=(0.6, 0.2, 0.2))
    prepare(str(folder / "ids.npz"), url, options, WriteConfig(block_rows=16, shard_bytes=4000))
    return url


def _ids(batch) -> list[int]:
    return [round(v * 1000) for v in batch["input"][:, 0, 0, 0].tolist()]


def test_schema_one_kind_of_data_and_no_credentials():
    assert DataConfig().source == "builtin:digits" and DataConfig().train is None
    streamed = DataConfig(train={"url": "s3://b/d"}, cache={"max_bytes": "2GB"})
    assert streamed.source is None and streamed.cache.max_bytes == 2 << 30
    assert DataConfig.model_validate(streamed.model_dump(mode="json")) == streamed
    assert DataConfig(train={"url": "x"}, drop_last=True).remainder_policy == "drop"
    bad = [
        ({"source": "builtin:digits", "train": {"url": "x"}}, "exclude each other"),
        ({"val": {"url": "x"}}, "data.val needs data.train"),
        ({"remainder": "pad"}, "data.remainder needs data.train"),
        ({"train": {"url": "x"}, "storage_options": {"secret": "s"}}, "is a credential"),
        ({"train": {"url": "x"}, "image_size": 32}, "--image-size"),
        ({"train": {"url": "x"}, "remainder": "pad", "drop_last": True}, "contradicts"),
        ({"train": {"url": "x"}, "cache": {"max_bytes": "lots"}}, "is not a size"),
        ({"train": {"url": "x"}, "on_corrupt": "ignore"}, "on_corrupt"),
    ]
    for fields, message in bad:
        with pytest.raises(ValidationError, match=message):
            DataConfig(**fields)


def test_eval_shares_cover_each_split_once(ids_url: str):
    splits = build_splits(DataConfig(train={"url": ids_url}, batch_size=8), seed=0)
    sizes = splits.info.num_samples
    assert sum(sizes.values()) == NUM_ROWS and min(sizes.values()) > 30
    assert splits.info.input_shape == (1, 6, 6) and splits.info.num_classes == 3
    seen = []
    for split in ("val", "test"):
        for rank in range(3):
            loader = splits.eval_loader(split, batch_size=7, rank=rank, world_size=3)
            seen += [i for batch in loader for i in _ids(batch)]
    train = splits.train_loader(global_batch_size=8, rank=0, world_size=1, grad_accum_steps=1)
    seen += [i for step in train for micro in step for i in _ids(micro)]
    assert sorted(seen) == list(range(NUM_ROWS))  # train + val + test, each row once
    assert splits.metrics() == {"data/corrupt_shards_skipped": 0.0}


def test_streamed_augmentation_is_seeded_per_row(ids_url: str):
    from roundhouse.config import AugmentConfig

    config = DataConfig(train={"url": ids_url}, batch_size=12)

    def images(world: int, augment: AugmentConfig | None) -> list:
        out = []
        for rank in range(world):
            loader = build_splits(config, seed=4).train_loader(
                global_batch_size=12,
                rank=rank,
                world_size=world,
                grad_accum_steps=1,
                augment=augment,
            )
            out += [image for step in loader for micro in step for image in micro["input"]]
        return out

    def by_row(world: int) -> dict[int, object]:
        plain = images(world, None)  # the same rows in the same places, not augmented
        noisy = images(world, AugmentConfig(gaussian_noise=0.1))
        return {round(float(p[0, 0, 0]) * 1000): n for p, n in zip(plain, noisy, strict=True)}

    one, two = by_row(1), by_row(2)
    assert one.keys() == two.keys() and len(one) > 100
    assert all(torch.equal(one[row], two[row]) for row in one)  # whatever the world
    assert any((one[row] - row / 1000).abs().max() > 0.01 for row in one)  # noise was added


def test_schema_that_does_not_fit_the_task(ids_url: str, tmp_path: Path):
    splits = build_splits(DataConfig(train={"url": ids_url}), seed=0)
    splits.check_task("classification", "mlp")
    with pytest.raises(DataError, match=r"field 'input' of .* model gpt needs token ids"):
        splits.check_task("language_model", "gpt")
    unlabeled = tmp_path / "x.npy"
    np.save(unlabeled, np.zeros((40, 3), dtype=np.float32))
    url = str(tmp_path / "unlabeled")
    prepare(str(unlabeled), url, PrepareOptions(split=(0.5, 0.25, 0.25)), WriteConfig())
    with pytest.raises(DataError, match="has no field 'target'"):
        build_splits(DataConfig(train={"url": url}), seed=0).check_task("classification", "mlp")
    with pytest.raises(DataError, match=r"data.val: dataset .*unlabeled has no split 'val2'"):
        build_splits(DataConfig(train={"url": url}, val={"url": url, "split": "val2"}), seed=0)
