"""The data layer's shared types: `ArrayDataset` (in-memory samples) and `DataInfo`.

Small and import-light so that sources, loaders and the streaming package all use them without
importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from roundhouse.errors import DataError

from .transforms import Transform, augment_batch


class ArrayDataset(Dataset):
    """Samples held as tensors in memory: `inputs` `(N, ...)`, `targets` `(N, ...)`.

    Images are float32 `(N, C, H, W)` with int64 `(N,)` labels; text is int64 `(N, T)` both.

    Without a transform, `__getitems__` is plain fancy indexing (no per-sample Python work).
    With one (see `with_transform`), each sample is augmented with randomness seeded by
    (seed, epoch, index), where the epoch is whatever `set_epoch` last set.
    """

    def __init__(
        self, inputs: Tensor, targets: Tensor, *, transform: Transform | None = None, seed: int = 0
    ) -> None:
        if inputs.shape[0] != targets.shape[0]:
            raise DataError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
        self.inputs = inputs
        self.targets = targets
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample's input, e.g. `(C, H, W)`."""
        return tuple(self.inputs.shape[1:])

    def with_transform(self, transform: Transform | None, seed: int) -> ArrayDataset:
        """Returns a view sharing this dataset's tensors that augments with `transform`.

        A view instead of mutation, so the caller's dataset (also used for evaluation) stays
        un-augmented.
        """
        return ArrayDataset(self.inputs, self.targets, transform=transform, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the per-sample augmentation."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """Returns `{"input": (C, H, W), "target": ()}` for one sample."""
        batch = self.__getitems__([index])
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """Returns the batch `{"input": (B, C, H, W), "target": (B,)}` of `indices`, in order."""
        positions = torch.as_tensor(indices, dtype=torch.long)
        inputs = self.inputs[positions]
        if self.transform is not None:
            inputs = augment_batch(
                self.transform, inputs, positions.tolist(), seed=self.seed, epoch=self.epoch
            )
        return {"input": inputs, "target": self.targets[positions]}


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data.

    Attributes:
        input_shape: Per-sample input shape after resizing, e.g. `(C, H, W)`.
        num_classes: Number of target classes; for value targets, the number of model outputs
            (the size of one sample's target).
        num_samples: Split sizes, `{"train": ..., "val": ..., "test": ...}`.
        target_shape: None for class labels; the per-sample shape of float value targets
            (`()` for one value, `(D,)` for a vector) for regression.
        vocab_size: Token vocabulary of text inputs (None for images): what a text model's
            embedding is built for, whatever its outputs are.
    """

    input_shape: tuple[int, ...]
    num_classes: int
    num_samples: dict[str, int]
    target_shape: tuple[int, ...] | None = None
    vocab_size: int | None = None

    @property
    def has_values(self) -> bool:
        """Whether the targets are float values (regression) rather than class labels."""
        return self.target_shape is not None
