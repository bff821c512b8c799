"""Prepared datasets in a job: `data.train` (and `val`/`test`) -> `StreamingSplits`.

`StreamingSplits` plays the part `Splits` plays for in-memory sources: it knows the data's
`info` (input shape and class count, read from the index, nothing downloaded), builds each
rank's training loader (a `StreamingLoader`: the rank streams its own partition straight from
storage) and streams evaluation sets, each rank reading a contiguous share of the split.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from roundhouse.config import AugmentConfig, DataConfig, StreamSplitConfig
from roundhouse.errors import DataError

from ..sampler import eval_share
from ..transforms import build_augmentation
from ..types import DataInfo
from .dataset import Batch, StreamConfig, StreamingDataset, StreamingLoader
from .index import Index

logger = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "test")
_LM_TASKS = ("language_model", "masked_lm")


class StreamingEvalLoader:
    """One rank's contiguous share of an evaluation split, in storage order, never augmented.

    Over all ranks every sample is read exactly once (no padding), like `EvalLoader`. Rows of
    shards skipped as corrupt are left out.
    """

    def __init__(
        self, dataset: StreamingDataset, *, batch_size: int, rank: int, world_size: int
    ) -> None:
        if batch_size < 1:
            raise DataError(f"evaluation batch size must be positive, got {batch_size}")
        self.dataset, self.batch_size = dataset, batch_size
        self.share = eval_share(dataset.layout.num_rows, rank, world_size)

    def __len__(self) -> int:
        return -(-len(self.share) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        rows = np.arange(self.share.start, self.share.stop, dtype=np.int64)
        reader = self.dataset.reader
        blocks = np.searchsorted(self.dataset.layout.block_starts, rows, side="right") - 1
        shard_of = self.dataset.layout.shard_of_block()
        reader.plan_shards([int(s) for s in dict.fromkeys(shard_of[blocks].tolist())])
        for start in range(0, len(rows), self.batch_size):
            batch = reader.read(rows[start : start + self.batch_size])
            if batch["input"].shape[0]:
                yield batch

    @property
    def corrupt_names(self) -> frozenset[str]:
        """Shards skipped as corrupt while evaluating."""
        return self.dataset.corrupt_names


class StreamingSplits:
    """Train/val/test of a job whose data lives in prepared datasets (see the module docs).

    Args:
        config: The job's `data` section (with `train` set).
        seed: The run seed (shuffle order and augmentation).

    Raises:
        DataError: For a missing index or split, or evaluation splits whose samples do not
            match the training split's schema.
    """

    def __init__(self, config: DataConfig, seed: int) -> None:
        assert config.train is not None, "StreamingSplits needs data.train"
        self.config, self.seed = config, seed
        self.sources = {"train": config.train} | {
            name: getattr(config, name) or StreamSplitConfig(url=config.train.url, split=name)
            for name in EVAL_SPLITS
        }
        self.datasets = {name: self._dataset(name) for name in self.sources}
        self.index: Index = self.datasets["train"].index
        for name in EVAL_SPLITS:
            self._check_same_schema(name)
        self._train_loaders: list[StreamingLoader] = []
        self._eval_loaders: dict[tuple[str, int, int, int], StreamingEvalLoader] = {}

    def _dataset(self, name: str, **overrides: Any) -> StreamingDataset:
        source = self.sources[name]
        cache = self.config.cache
        stream = StreamConfig(
            split=source.split or name,
            seed=self.seed,
            shuffle=self.config.shuffle if name == "train" else False,
            remainder=self.config.remainder_policy if name == "train" else "partial",
            buffer_rows=self.config.shuffle_buffer,
            cache_dir=cache.dir,
            cache_limit_bytes=cache.max_bytes,
            prefetch_shards=cache.prefetch_shards,
            on_corrupt=self.config.on_corrupt,
            global_batch_size=overrides.pop("global_batch_size", 1),
            **overrides,
        )
        try:
            return StreamingDataset(source.url, stream, self.config.storage_options or None)
        except DataError as err:
            if name == "train" or "has no split" not in err.what:
                raise
            raise DataError(
                f"data.{name}: {err.what}",
                f"set data.{name}.url (and .split), or prepare the data with --split 0.8,0.1,0.1",
            ) from err

    def _check_same_schema(self, name: str) -> None:
        ours, theirs = self.index, self.datasets[name].index
        if ours.input != theirs.input or ours.extra.get("vocab_size") != theirs.extra.get(
            "vocab_size"
        ):
            where = self.sources[name].url
            raise DataError(
                f"field 'input' of data.{name} ({where}) is {theirs.input.dtype} "
                f"{list(theirs.input.shape)}, data.train has {ours.input.dtype} "
                f"{list(ours.input.shape)}",
                f"point data.{name} at a dataset prepared like the training data",
            )

    @property
    def is_text(self) -> bool:
        """True for packed token ids (`data prepare --tokenizer`)."""
        return self.index.input.dtype == "int32"

    @property
    def info(self) -> DataInfo:
        """Input shape and class count (vocabulary size for text) from the index."""
        shape, vocab = tuple(self.index.input.shape), None
        if self.is_text:  # rows hold seq_len + 1 tokens: input and shifted target
            vocab = int(self.index.extra.get("vocab_size", 0))
            shape, classes = (shape[0] - 1,), vocab
        else:
            classes = self.index.num_classes or 0
        sizes = {name: d.layout.num_rows for name, d in self.datasets.items()}
        values = self.index.extra.get("target_shape")  # float value targets (regression)
        target_shape = None if values is None else tuple(values)
        return DataInfo(shape, classes, sizes, target_shape, vocab_size=vocab)

    @property
    def input_dtype(self) -> torch.dtype:
        """The dtype of `batch["input"]`: int64 token ids or float32."""
        return torch.int64 if self.is_text else torch.float32

    def check_task(self, kind: str, model: str) -> None:
        """Checks that the data fits the model's task (`ModelSpec.loss`).

        Raises:
            DataError: Images for a language model, text or unlabeled data for a classifier.
        """
        url, schema = self.config.train.url, self.index.input
        stored = f"{schema.dtype} {list(schema.shape)}"
        if kind in _LM_TASKS and not self.is_text:
            raise DataError(
                f"field 'input' of {url} holds {stored} samples; model {model} needs token ids",
                "prepare a text corpus with --tokenizer, or pick a model for this data",
            )
        if kind == "classification" and (self.is_text or self.index.num_classes is None):
            raise DataError(
                f"{url} has no field 'target' with class labels ({stored} inputs); model "
                f"{model} is a classifier",
                "prepare the data with labels (--target-field), or pick a model for this data",
            )

    def train_loader(
        self,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        grad_accum_steps: int,
        num_workers: int = 0,
        augment: AugmentConfig | None = None,
    ) -> StreamingLoader:
        """This rank's training loader: its partition of every global batch."""
        dataset = self._dataset(
            "train",
            global_batch_size=global_batch_size,
            rank=rank,
            world_size=world_size,
            grad_accum_steps=grad_accum_steps,
        )
        if augment is not None and not self.is_text:
            dataset.transform = build_augmentation(augment, dataset.info.input_shape)
        loader = StreamingLoader(dataset, num_workers=num_workers)
        self._train_loaders.append(loader)
        return loader

    def eval_loader(
        self, split: str, *, batch_size: int, rank: int, world_size: int
    ) -> StreamingEvalLoader:
        """Rank `rank`'s evaluation batches of `split` (`val` or `test`), kept for reuse."""
        key = (split, batch_size, rank, world_size)
        if key not in self._eval_loaders:
            self._eval_loaders[key] = StreamingEvalLoader(
                self.datasets[split], batch_size=batch_size, rank=rank, world_size=world_size
            )
        return self._eval_loaders[key]

    def metrics(self) -> dict[str, float]:
        """`data/corrupt_shards_skipped`: distinct shards this rank skipped (train and eval)."""
        names: set[str] = set()
        for loader in self._train_loaders:
            names |= loader.corrupt_shards
        for split in EVAL_SPLITS:
            names |= self.datasets[split].corrupt_names
        return {"data/corrupt_shards_skipped": float(len(names))}


def build_streaming_splits(config: DataConfig, seed: int) -> StreamingSplits:
    """The job's prepared datasets (see `StreamingSplits`)."""
    splits = StreamingSplits(config, seed)
    info = splits.info
    logger.info("data %s: %s, input shape %s", config.train.url, info.num_samples, info.input_shape)
    return splits
