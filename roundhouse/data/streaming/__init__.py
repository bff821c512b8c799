"""Streaming sharded datasets: `prepare` writes Parquet shards plus `index.json` to any fsspec
URL; `StreamingDataset` streams one rank's steps with a deterministic, world-independent order.

Only pyarrow and fsspec underneath (s3fs/gcsfs for those protocols); nothing here imports ray,
deepspeed or torch.distributed.
"""

from .dataset import StreamConfig, StreamingDataset, StreamingLoader
from .index import FORMAT_VERSION, Index, InputSchema, ShardInfo, read_index
from .order import REMAINDERS, Layout, epoch_order, plan_epoch
from .prepare import PrepareOptions, build_source, prepare
from .writer import Chunk, WriteConfig, parse_size, write_dataset

__all__ = [
    "FORMAT_VERSION",
    "REMAINDERS",
    "Chunk",
    "Index",
    "InputSchema",
    "Layout",
    "PrepareOptions",
    "ShardInfo",
    "StreamConfig",
    "StreamingDataset",
    "StreamingLoader",
    "WriteConfig",
    "build_source",
    "epoch_order",
    "parse_size",
    "plan_epoch",
    "prepare",
    "read_index",
    "write_dataset",
]
