"""In-memory data sources and their seeded train/val/test split (`ArrayDataset`s).

Sources are a plain dict from name to a loader function. Each returns all samples as float32
`(N, C, H, W)` inputs in [0, 1] and int64 `(N,)` labels (or, for regression sources such as
`builtin:diabetes`, float32 feature vectors and float32 value targets); `build_splits` then
resizes once, permutes with the run seed and cuts the permutation by `data.split`.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from roundhouse.config import DataConfig
from roundhouse.errors import DataError

from .folds import rotate_fold
from .loader import build_eval_loader
from .pydoc_corpus import load_pydoc_classification, load_pydoc_pairs, load_pydoc_text
from .sampler import SPLIT_STREAM, SYNTHETIC_STREAM, seeded_generator
from .text import encode, load_pytext_splits
from .text_tokens import split_tokenizer_options
from .types import ArrayDataset, DataInfo

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """The three splits of a source plus their `DataInfo`.

    The trainer also uses `eval_loader`, `metrics`, `input_dtype` and `check_task`, which
    `roundhouse.data.streaming.StreamingSplits` (data streamed from storage) has too.
    """

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    info: DataInfo

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of `batch["input"]`."""
        return self.train.inputs.dtype

    def eval_loader(self, split: str, *, batch_size: int, rank: int, world_size: int) -> Any:
        """Rank `rank`'s evaluation batches of `split` (`val` or `test`); see `EvalLoader`."""
        dataset = getattr(self, split)
        return build_eval_loader(dataset, batch_size=batch_size, rank=rank, world_size=world_size)

    def metrics(self) -> dict[str, float]:
        """Data metrics to log with the training metrics (none for in-memory data)."""
        return {}

    def check_task(self, kind: str, model: str) -> None:
        """In-memory sources fit their models by construction; nothing to check."""


@dataclass(frozen=True)
class _Loaded:
    """A source's samples. `split_sizes` is set when the source split them itself (text splits
    by file, so chunks of one file never land in two splits): the samples are then in train,
    val, test order and `build_splits` keeps that order."""

    inputs: Tensor
    targets: Tensor
    num_classes: int
    split_sizes: tuple[int, int, int] | None = None
    target_shape: tuple[int, ...] | None = None  # float value targets (regression)
    vocab_size: int | None = None


def _no_options(source: str, options: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(
            f"unknown option {unknown[0]!r} for source {source}",
            f"valid options: {', '.join(allowed) or 'none'}",
        )


def _load_digits(options: dict[str, Any]) -> _Loaded:
    _no_options("builtin:digits", options, ())
    images, target = _digits_arrays()
    # Pixel values are integers 0..16.
    inputs = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    targets = torch.as_tensor(target, dtype=torch.int64)
    return _Loaded(inputs, targets, num_classes=10)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, (images (N, 8, 8), labels (N,)), read from its bundled file.

    Importing scikit-learn costs more than a second per process (every Ray worker pays it at
    start), so the CSV that `load_digits` parses is read directly; `load_digits` itself only if
    this scikit-learn keeps the file elsewhere.
    """
    path = _sklearn_data_file("digits.csv.gz")
    if path is not None:
        with gzip.open(path, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _sklearn_data_file(name: str) -> Path | None:
    """A file scikit-learn bundles in `sklearn/datasets/data`, found without importing it
    (importing scikit-learn costs more than a second in every worker)."""
    spec = importlib.util.find_spec("sklearn")
    for folder in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def _diabetes_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's diabetes: 442 patients, 10 raw features and a disease-progression value."""
    data, target = (_sklearn_data_file(f) for f in DIABETES_FILES)
    if data is None or target is None:
        from sklearn.datasets import load_diabetes

        raw = load_diabetes(scaled=False)
        return raw.data, raw.target
    return np.loadtxt(data), np.loadtxt(target)


DIABETES_FILES = ("diabetes_data_raw.csv.gz", "diabetes_target.csv.gz")


def _load_diabetes(options: dict[str, Any]) -> _Loaded:
    """Regression: `(N, 10)` standardized features and one standardized target value.

    Features and target are z-scores over the whole file (as scikit-learn's `scaled=True` does
    for the features), so an MLP trains with its default learning rates; R² is unchanged by
    this affine map of the target.
    """
    _no_options("builtin:diabetes", options, ())
    data, target = _diabetes_arrays()
    features = (data - data.mean(0)) / data.std(0)
    values = (target - target.mean()) / target.std()
    inputs = torch.as_tensor(features, dtype=torch.float32)
    targets = torch.as_tensor(values, dtype=torch.float32)
    return _Loaded(inputs, targets, num_classes=1, target_shape=())


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(
            f"data.options.{name} must be a positive integer, got {value!r}",
            f"set data.options.{name} to e.g. 8",
        )
    return value


def _synthetic_shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 3:
        raise DataError(
            f"data.options.shape must be a list of 1 to 3 sizes, got {value!r}",
            "use e.g. [3, 32, 32] (C, H, W)",
        )
    return tuple(_positive_int("shape", size) for size in value)


_SYNTHETIC_OPTIONS = ("shape", "num_samples", "num_classes", "seed")


def _load_synthetic(options: dict[str, Any]) -> _Loaded:
    _no_options("builtin:synthetic", options, _SYNTHETIC_OPTIONS)
    shape = _synthetic_shape(options.get("shape", [3, 32, 32]))
    num_samples = _positive_int("num_samples", options.get("num_samples", 1024))
    num_classes = _positive_int("num_classes", options.get("num_classes", 10))
    seed = options.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"data.options.seed must be an integer, got {seed!r}")
    # The data depends on the options only (not on trainer.seed), so runs with different seeds
    # see the same samples, split differently.
    generator = seeded_generator(seed, SYNTHETIC_STREAM)
    targets = torch.randint(num_classes, (num_samples,), generator=generator)
    # Each class has a prototype image; samples are half prototype, half noise, so a model can
    # learn something while the values stay in [0, 1].
    prototypes = torch.rand((num_classes, *shape), generator=generator)
    noise = torch.rand((num_samples, *shape), generator=generator)
    inputs = 0.5 * prototypes[targets] + 0.5 * noise
    return _Loaded(inputs, targets, num_classes=num_classes)


def _load_pytext(options: dict[str, Any], split: Sequence[float], seed: int) -> _Loaded:
    options, encoder, vocab_size = split_tokenizer_options(options, "builtin:pytext")
    parts, _ = load_pytext_splits(options, split, seed, encoder)
    sizes = tuple(inputs.shape[0] for inputs, _ in parts)
    inputs = torch.cat([inputs for inputs, _ in parts])
    targets = torch.cat([targets for _, targets in parts])
    return _Loaded(inputs, targets, vocab_size, split_sizes=sizes, vocab_size=vocab_size)  # type: ignore[arg-type]


# Sources that split themselves get the split fractions and the run seed too.
_load_pytext.splits_itself = True  # type: ignore[attr-defined]


def _load_pydoc_cls(options: dict[str, Any], split: Sequence[float], seed: int) -> _Loaded:
    # The split is fixed by a hash of each function's name (see pydoc_corpus), not by `seed`.
    del split, seed
    options, encoder, vocab_size = split_tokenizer_options(options, "builtin:pydoc-cls")
    parts, names = load_pydoc_classification(options, encoder or encode)
    sizes = tuple(inputs.shape[0] for inputs, _ in parts)
    inputs = torch.cat([inputs for inputs, _ in parts])
    targets = torch.cat([targets for _, targets in parts])
    return _Loaded(
        inputs,
        targets,
        len(names),
        split_sizes=sizes,
        vocab_size=vocab_size,  # type: ignore[arg-type]
    )


_load_pydoc_cls.splits_itself = True  # type: ignore[attr-defined]


def _load_pydoc_pairs(
    options: dict[str, Any], split: Sequence[float], seed: int, source: str = "builtin:pydoc-pairs"
) -> _Loaded:
    del split, seed  # the fixed hash split of pydoc_corpus, as pydoc-cls
    parts, vocab_size = load_pydoc_pairs(options, source)
    sizes = tuple(inputs.shape[0] for inputs, _ in parts)
    inputs = torch.cat([inputs for inputs, _ in parts])
    targets = torch.cat([targets for _, targets in parts])
    return _Loaded(
        inputs,
        targets,
        vocab_size,
        split_sizes=sizes,
        vocab_size=vocab_size,  # type: ignore[arg-type]
    )


_load_pydoc_pairs.splits_itself = True  # type: ignore[attr-defined]


def _load_unicode_pairs(options: dict[str, Any], split: Sequence[float], seed: int) -> _Loaded:
    return _load_pydoc_pairs(options, split, seed, "builtin:unicode-pairs")


_load_unicode_pairs.splits_itself = True  # type: ignore[attr-defined]


def _load_pydoc_text(options: dict[str, Any], split: Sequence[float], seed: int) -> _Loaded:
    del split, seed  # the fixed hash split of pydoc_corpus
    options, encoder, vocab_size = split_tokenizer_options(options, "builtin:pydoc-text")
    parts = load_pydoc_text(options, encoder)
    sizes = tuple(inputs.shape[0] for inputs, _ in parts)
    inputs = torch.cat([inputs for inputs, _ in parts])
    targets = torch.cat([targets for _, targets in parts])
    return _Loaded(inputs, targets, vocab_size, split_sizes=sizes, vocab_size=vocab_size)  # type: ignore[arg-type]


_load_pydoc_text.splits_itself = True  # type: ignore[attr-defined]

SOURCES: dict[str, Callable[..., _Loaded]] = {
    "builtin:digits": _load_digits,
    "builtin:synthetic": _load_synthetic,
    "builtin:pytext": _load_pytext,
    "builtin:pydoc-cls": _load_pydoc_cls,
    "builtin:diabetes": _load_diabetes,
    "builtin:pydoc-pairs": _load_pydoc_pairs,
    "builtin:pydoc-text": _load_pydoc_text,
    "builtin:unicode-pairs": _load_unicode_pairs,
}
# Sources whose targets are float values (regression), known without loading them.
VALUE_TARGET_SOURCES = frozenset({"builtin:diabetes"})


def _load(config: DataConfig, seed: int) -> _Loaded:
    loader = SOURCES.get(config.source)
    if loader is None:
        raise DataError(
            f"unknown data source {config.source!r}",
            f"valid sources: {', '.join(sorted(SOURCES))}",
        )
    if getattr(loader, "splits_itself", False):
        return loader(dict(config.options), config.split, seed)
    return loader(dict(config.options))


def _resize(inputs: Tensor, image_size: int | None) -> Tensor:
    if image_size is None:
        return inputs
    if inputs.dim() != 4:
        raise DataError(
            f"data.image_size needs (C, H, W) samples, got shape {tuple(inputs.shape[1:])}",
            "remove data.image_size",
        )
    if inputs.shape[-2:] == (image_size, image_size):
        return inputs
    size = (image_size, image_size)
    # Once at build time, so training never pays for the resize again.
    resized = F.interpolate(inputs, size=size, mode="bilinear", antialias=True)
    return resized.clamp_(0.0, 1.0)


def _split_sizes(num_samples: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    train_end = round(num_samples * fractions[0])
    val_end = round(num_samples * (fractions[0] + fractions[1]))
    sizes = (train_end, val_end - train_end, num_samples - val_end)
    if min(sizes) < 1:
        raise DataError(
            f"data.split {list(fractions)} of {num_samples} samples gives split sizes "
            f"{list(sizes)} (train/val/test); every split needs at least one sample",
            "use more samples or larger fractions",
        )
    return sizes


def build_source_splits(config: DataConfig, seed: int) -> Splits:
    """Loads the in-memory `config.source`, resizes it and splits it into train/val/test.

    The split is a permutation seeded by `seed` (the job's `trainer.seed`): the same seed gives
    the same split on every rank and every run.

    Args:
        config: The job's `data` section.
        seed: The run seed.

    Returns:
        The three splits (without augmentation) and their `DataInfo`.

    Raises:
        DataError: For an unknown source, a bad source option or a split with an empty part.
    """
    loaded = _load(config, seed)
    inputs = _resize(loaded.inputs, config.image_size)
    if loaded.split_sizes is not None:
        sizes, order = loaded.split_sizes, torch.arange(inputs.shape[0])
    else:
        sizes = _split_sizes(inputs.shape[0], config.split)
        order = torch.randperm(inputs.shape[0], generator=seeded_generator(seed, SPLIT_STREAM))
    if config.fold is not None:  # k-fold cross-validation: a rotating val split
        sizes, order = rotate_fold(order, sizes, config.fold)
    parts = torch.split(order, sizes)
    datasets = [ArrayDataset(inputs[part], loaded.targets[part]) for part in parts]
    info = DataInfo(
        input_shape=tuple(inputs.shape[1:]),
        num_classes=loaded.num_classes,
        num_samples=dict(zip(("train", "val", "test"), sizes, strict=True)),
        target_shape=loaded.target_shape,
        vocab_size=loaded.vocab_size,
    )
    logger.info("data %s: %s, input shape %s", config.source, info.num_samples, info.input_shape)
    return Splits(*datasets, info=info)
