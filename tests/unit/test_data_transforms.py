"""Augmentation: what it builds, that it changes inputs, and that it is seeded per sample."""

from __future__ import annotations

import pytest
import torch

from roundhouse.config import AugmentConfig
from roundhouse.data import ArrayDataset, StepLoader, build_augmentation
from roundhouse.errors import DataError

EVERYTHING = AugmentConfig(
    hflip=0.5,
    rotation=15,
    translate=0.1,
    scale=(0.9, 1.1),
    random_crop_padding=2,
    color_jitter=0.4,
    gaussian_noise=0.05,
    random_erasing=0.5,
)


def image_dataset(num_samples: int = 24, channels: int = 3) -> ArrayDataset:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(num_samples, channels, 10, 10, generator=generator)
    return ArrayDataset(inputs, torch.arange(num_samples))


def test_all_off_builds_nothing():
    assert build_augmentation(AugmentConfig(), (3, 8, 8)) is None
    # mixup is batch-level, not a per-sample transform
    assert build_augmentation(AugmentConfig(mixup_alpha=0.2), (3, 8, 8)) is None


@pytest.mark.parametrize("channels", [1, 3])
def test_everything_on_keeps_shape_and_range(channels):
    transform = build_augmentation(EVERYTHING, (channels, 10, 10))
    torch.manual_seed(0)
    out = transform(torch.rand(channels, 10, 10))
    assert out.shape == (channels, 10, 10)
    assert out.min() >= 0 and out.max() <= 1


def test_flip_changes_the_input_as_asked():
    dataset = image_dataset()
    flipped = dataset.with_transform(build_augmentation(AugmentConfig(hflip=1.0), (3, 10, 10)), 0)
    assert torch.equal(flipped[2]["input"], dataset[2]["input"].flip(-1))
    assert torch.equal(flipped[2]["target"], dataset[2]["target"])


def test_augmentation_changes_inputs_but_not_the_source():
    dataset = image_dataset()
    before = dataset.inputs.clone()
    view = dataset.with_transform(build_augmentation(EVERYTHING, (3, 10, 10)), seed=1)
    batch = view.__getitems__(list(range(8)))
    assert not torch.equal(batch["input"], before[:8])
    assert torch.equal(dataset.inputs, before)
    assert torch.equal(dataset[0]["input"], before[0])  # the original stays un-augmented


def test_seeded_by_seed_epoch_and_index_not_batch():
    view = image_dataset().with_transform(build_augmentation(EVERYTHING, (3, 10, 10)), seed=5)
    view.set_epoch(2)
    alone = view.__getitems__([3, 11, 7])["input"]
    mixed = view.__getitems__([7, 0, 3, 19])["input"]
    assert torch.equal(alone[0], mixed[2]) and torch.equal(alone[2], mixed[0])
    view.set_epoch(3)
    assert not torch.equal(view.__getitems__([3])["input"][0], alone[0])
    other_seed = view.with_transform(view.transform, seed=6)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed.__getitems__([3])["input"][0], alone[0])


def test_global_rng_is_untouched():
    view = image_dataset().with_transform(build_augmentation(EVERYTHING, (3, 10, 10)), seed=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    view.__getitems__([0, 1, 2])
    assert torch.equal(torch.rand(3), expected)


def _loader(dataset, world_size, rank, **kwargs):
    return StepLoader(
        dataset,
        global_batch_size=8,
        rank=rank,
        world_size=world_size,
        grad_accum_steps=1,
        seed=9,
        shuffle=True,
        drop_last=False,
        augment=EVERYTHING,
        **kwargs,
    )


def test_augmented_batches_do_not_depend_on_world_size():
    dataset = image_dataset(num_samples=20)
    single = _loader(dataset, 1, 0)
    single.set_epoch(1)
    whole = [step[0]["input"] for step in single]
    shards = [_loader(dataset, 3, rank) for rank in range(3)]
    for shard in shards:
        shard.set_epoch(1)
    for expected, parts in zip(whole, zip(*shards, strict=True), strict=True):
        assert torch.equal(torch.cat([p[0]["input"] for p in parts]), expected)


def test_augmentation_needs_images():
    with pytest.raises(DataError, match=r"\(C, H, W\)"):
        build_augmentation(AugmentConfig(hflip=0.5), (16,))
