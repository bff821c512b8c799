"""The job file's `data:` section: in-memory sources, streamed datasets, augmentation."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from .base import NonNegInt, Section

# --- data --------------------------------------------------------------------------------------


class AugmentConfig(Section):
    """Training-time augmentation (train split only). Zero or null turns a transform off."""

    hflip: Annotated[float, Field(ge=0, le=1)] = Field(0.0, description="Probability of a flip.")
    rotation: Annotated[float, Field(ge=0)] = Field(0.0, description="Max rotation in degrees.")
    translate: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="Max shift as a fraction of width/height."
    )
    scale: tuple[PositiveFloat, PositiveFloat] | None = Field(
        None, description="Random scaling range, e.g. [0.9, 1.1]."
    )
    random_crop_padding: NonNegInt = Field(0, description="Pad then randomly crop back (pixels).")
    color_jitter: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Brightness/contrast/saturation jitter strength."
    )
    gaussian_noise: Annotated[float, Field(ge=0)] = Field(0.0, description="Noise std.")
    random_erasing: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="Probability of erasing a random rectangle (cutout)."
    )
    mixup_alpha: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Beta(alpha, alpha) mixup of batches; 0 is off."
    )


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Storage options that are credentials: they come from the environment, never from job files.
_SECRET_OPTIONS = ("key", "secret", "token", "password", "access_key", "secret_key", "credentials")


def _byte_size(value: Any) -> Any:
    """`16GB`, `512MB`, `1e9` or an int -> bytes (other values are left to pydantic to reject)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().removesuffix("ib").removesuffix("b")
    unit = text[-1] if text and text[-1] in _SIZE_UNITS else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"{value!r} is not a size; write it like 16GB or 512MB") from None


class StreamSplitConfig(Section):
    """One split of a dataset written by `roundhouse data prepare` (see docs/data.md)."""

    url: Annotated[str, Field(min_length=1)] = Field(
        description="Dataset folder holding index.json: s3://bucket/digits/, gs://..., a path."
    )
    split: str | None = Field(
        None, description="Split name inside the dataset; default: this key (train/val/test)."
    )

    @field_validator("url")
    @classmethod
    def _absolute_local_path(cls, value: str) -> str:
        # Resolved where the job is validated first (the launcher), so workers with another
        # working directory read the same folder.
        if "://" in value or os.path.isabs(value):
            return value
        return os.path.abspath(value)


class StreamCacheConfig(Section):
    """The local cache of downloaded shards (remote datasets only; local ones are read in place)."""

    dir: str | None = Field(
        None, description="Cache folder; default $ROUNDHOUSE_CACHE/shards or ~/.cache/roundhouse."
    )
    max_bytes: PositiveInt = Field(
        16 << 30, description="Evict least recently used shards above this size, e.g. 16GB."
    )
    prefetch_shards: NonNegInt = Field(2, description="Shards downloaded ahead in the background.")

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        return _byte_size(value)


class DataConfig(Section):
    """Where samples come from and how they are batched.

    Either `source` (an in-memory built-in, split with `split`) or `train` (a prepared dataset
    on storage, streamed; `val`/`test` default to the same dataset's `val`/`test` splits).
    """

    source: str | None = Field(
        None,
        description="`builtin:digits` (the default without data.train), `builtin:synthetic`, "
        "`builtin:pytext` (stdlib text) or `builtin:pydoc-cls` (stdlib docstrings labelled by "
        "package), held in memory.",
    )
    train: StreamSplitConfig | None = Field(
        None, description="Stream training data from a prepared dataset (excludes data.source)."
    )
    val: StreamSplitConfig | None = Field(
        None, description="Validation split; default: the train dataset's `val` split."
    )
    test: StreamSplitConfig | None = Field(
        None, description="Test split; default: the train dataset's `test` split."
    )
    remainder: Literal["drop", "partial", "pad"] | None = Field(
        None,
        description="Streamed data: the last partial global batch is dropped, kept (partial) "
        "or padded from the epoch's start; default: drop if drop_last else partial.",
    )
    on_corrupt: Literal["error", "skip"] = Field(
        "error",
        description="Streamed data: a shard failing its sha256 stops the run or is "
        "skipped (counted as data/corrupt_shards_skipped).",
    )
    shuffle_buffer: PositiveInt = Field(
        16384, description="Streamed data: rows shuffled together (decoded samples in memory)."
    )
    cache: StreamCacheConfig = Field(default_factory=StreamCacheConfig)
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for data URLs, e.g. {endpoint_url: http://host:9000}; "
        "credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never from here.",
    )
    split: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (0.8, 0.1, 0.1), description="Train/val/test fractions of the source (seeded)."
    )
    fold: tuple[NonNegInt, Annotated[int, Field(ge=2)]] | None = Field(
        None,
        description="k-fold cross-validation, [index, folds]: fold `index` of the train+val "
        "samples validates, the rest trains (`roundhouse train --folds K` sets it).",
    )
    batch_size: PositiveInt = Field(64, description="Global samples per optimizer step.")
    eval_batch_size: PositiveInt = Field(256, description="Samples per evaluation batch.")
    shuffle: bool = Field(True, description="Shuffle the training samples every epoch (seeded).")
    drop_last: bool = Field(False, description="Drop the last incomplete training batch.")
    num_workers: NonNegInt = Field(0, description="DataLoader worker processes per rank.")
    image_size: PositiveInt | None = Field(
        None, description="Resize images to this side length (e.g. 32 for digits on a VGG)."
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Source options, e.g. synthetic: {shape: [3, 32, 32], num_samples: 1024}.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_source(cls, value: Any) -> Any:
        # `source` defaults to builtin:digits only for jobs that do not stream `train`, so a
        # dumped job (source: null, train: {...}) validates again unchanged.
        if isinstance(value, dict) and value.get("train") is None and value.get("source") is None:
            return {**value, "source": "builtin:digits"}
        return value

    @model_validator(mode="after")
    def _split_sums_to_one(self) -> DataConfig:
        if abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(
                f"data.split must sum to 1, got {list(self.split)} = {sum(self.split)}"
            )
        return self

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> DataConfig:
        if self.train is not None and self.source is not None:
            raise ValueError(
                f"data.source ({self.source}) and data.train ({self.train.url}) exclude each "
                "other: remove one (data.train streams a prepared dataset)"
            )
        if self.fold is not None and (self.train is not None or self.fold[0] >= self.fold[1]):
            raise ValueError(f"data.fold={list(self.fold)} needs in-memory data and index < folds")
        if self.train is None:
            streamed = [k for k in ("val", "test", "remainder") if getattr(self, k) is not None]
            if streamed:
                raise ValueError(f"data.{streamed[0]} needs data.train (a prepared dataset)")
            return self
        if self.remainder not in (None, "drop") and self.drop_last:
            raise ValueError(f"data.drop_last=true contradicts data.remainder={self.remainder}")
        if self.image_size is not None:
            raise ValueError(
                "data.image_size does not apply to data.train: prepare the dataset with "
                "--image-size instead"
            )
        if self.augment.mixup_alpha > 0:
            raise ValueError("data.augment.mixup_alpha is not supported with data.train yet")
        return self

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, Any]) -> dict[str, Any]:
        secret = [k for k in value if k.lower() in _SECRET_OPTIONS]
        if secret:
            raise ValueError(
                f"data.storage_options.{secret[0]} is a credential; set it in the environment "
                "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) instead of the job file"
            )
        return value

    @property
    def remainder_policy(self) -> str:
        """`drop`, `partial` or `pad`: what happens to the last partial training batch."""
        if self.remainder is not None:
            return self.remainder
        return "drop" if self.drop_last else "partial"
