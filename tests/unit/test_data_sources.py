"""Sources, splits and ArrayDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from roundhouse.config import DataConfig
from roundhouse.data import ArrayDataset, DataInfo, build_splits
from roundhouse.errors import DataError


@pytest.fixture(scope="module")
def digits():
    return build_splits(DataConfig(), seed=0)


def _all(splits):
    parts = (splits.train, splits.val, splits.test)
    return torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts])


def test_digits_shapes_ranges_and_total(digits):
    inputs, targets = _all(digits)
    assert inputs.shape == (1797, 1, 8, 8)
    assert inputs.dtype == torch.float32 and targets.dtype == torch.int64
    assert inputs.min() == 0.0 and inputs.max() == 1.0
    assert set(targets.tolist()) == set(range(10))
    assert digits.info == DataInfo(
        input_shape=(1, 8, 8),
        num_classes=10,
        num_samples={"train": 1438, "val": 179, "test": 180},
    )


def test_split_sizes_follow_fractions():
    splits = build_splits(DataConfig(split=(0.7, 0.15, 0.15)), seed=0)
    assert splits.info.num_samples == {"train": 1258, "val": 269, "test": 270}
    assert [len(splits.train), len(splits.val), len(splits.test)] == [1258, 269, 270]


def test_digits_read_from_the_bundled_file_equal_scikit_learns():
    from sklearn.datasets import load_digits

    from roundhouse.data.sources import _digits_arrays

    images, target = _digits_arrays()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(target, reference.target)


def test_split_is_a_partition_of_the_source(digits):
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    inputs, targets = _all(digits)
    # Same multiset of samples: identical label histogram and identical sorted row sums.
    assert torch.equal(
        torch.bincount(targets), torch.bincount(torch.as_tensor(load_digits().target))
    )
    assert torch.allclose(
        inputs.flatten(1).sum(1).sort().values, raw.flatten(1).sum(1).sort().values
    )


def test_split_is_seeded(digits):
    again = build_splits(DataConfig(), seed=0)
    other = build_splits(DataConfig(), seed=1)
    assert torch.equal(again.train.inputs, digits.train.inputs)
    assert torch.equal(again.test.targets, digits.test.targets)
    assert not torch.equal(other.train.inputs, digits.train.inputs)


def test_synthetic_is_deterministic_and_configurable():
    config = DataConfig(
        source="builtin:synthetic",
        options={"shape": [2, 5, 6], "num_samples": 40, "num_classes": 3},
    )
    first, second = build_splits(config, seed=3), build_splits(config, seed=3)
    assert torch.equal(first.train.inputs, second.train.inputs)
    assert first.info.input_shape == (2, 5, 6) and first.info.num_classes == 3
    assert sum(first.info.num_samples.values()) == 40
    inputs, targets = _all(first)
    assert inputs.min() >= 0 and inputs.max() <= 1
    assert targets.max() < 3
    # trainer.seed changes the split, not the samples.
    reseeded = build_splits(config, seed=4)
    assert not torch.equal(reseeded.train.inputs, first.train.inputs)
    assert torch.allclose(_all(reseeded)[0].sum(), inputs.sum())


def test_synthetic_defaults():
    splits = build_splits(DataConfig(source="builtin:synthetic"), seed=0)
    assert splits.info.input_shape == (3, 32, 32)
    assert sum(splits.info.num_samples.values()) == 1024


def test_unknown_source_lists_valid_ones():
    with pytest.raises(
        DataError,
        match="builtin:digits, builtin:pydoc-cls, builtin:pydoc-pairs, builtin:pydoc-text, "
        "builtin:pytext, builtin:synthetic, builtin:unicode-pairs",
    ) as err:
        build_splits(DataConfig(source="builtin:mnist"), seed=0)
    assert "builtin:mnist" in str(err.value)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"shpe": [1, 2, 2]}, "shpe"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_classes": "ten"}, "num_classes"),
        ({"shape": [3, -1, 4]}, "shape"),
        ({"shape": 5}, "shape"),
    ],
)
def test_bad_synthetic_option_is_named(options, named):
    with pytest.raises(DataError, match=named):
        build_splits(DataConfig(source="builtin:synthetic", options=options), seed=0)


def test_digits_takes_no_options():
    with pytest.raises(DataError, match="shape"):
        build_splits(DataConfig(options={"shape": [1, 8, 8]}), seed=0)


def test_empty_split_is_an_error():
    config = DataConfig(source="builtin:synthetic", options={"num_samples": 5})
    with pytest.raises(DataError, match="at least one sample"):
        build_splits(config, seed=0)


def test_image_size_resizes_once():
    splits = build_splits(DataConfig(image_size=16), seed=0)
    assert splits.info.input_shape == (1, 16, 16)
    assert splits.train.inputs.shape[1:] == (1, 16, 16)
    assert splits.train.inputs.min() >= 0 and splits.train.inputs.max() <= 1


def test_dataset_items(digits):
    dataset = digits.val
    item = dataset[4]
    assert item["input"].shape == (1, 8, 8) and item["target"].shape == ()
    batch = dataset.__getitems__([4, 0, 4])
    assert batch["input"].shape == (3, 1, 8, 8) and batch["target"].shape == (3,)
    assert torch.equal(batch["input"][0], item["input"])
    assert torch.equal(batch["target"], dataset.targets[[4, 0, 4]])


def test_dataset_rejects_mismatched_lengths():
    with pytest.raises(DataError):
        ArrayDataset(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.int64))
