"""`build_splits`: a job's train/val/test data, from an in-memory source or streamed storage."""

from __future__ import annotations

from roundhouse.config import DataConfig

from .sources import Splits, build_source_splits
from .streaming.jobdata import StreamingSplits, build_streaming_splits


def build_splits(config: DataConfig, seed: int) -> Splits | StreamingSplits:
    """The job's three splits and their `DataInfo`.

    Args:
        config: The job's `data` section.
        seed: The run seed (`trainer.seed`): the same seed gives the same split on every rank.

    Returns:
        `Splits` of the in-memory `data.source`; with `data.train` set, a `StreamingSplits`
        over the prepared datasets instead (the same interface to the trainer).

    Raises:
        DataError: For an unknown source, a bad source option, a split with an empty part, or
            a prepared dataset that cannot be read.
    """
    if config.train is not None:  # a prepared dataset on storage, streamed
        return build_streaming_splits(config, seed)
    return build_source_splits(config, seed)
