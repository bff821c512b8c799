"""Data: in-memory sources, seeded splits, augmentation and per-rank step loaders.

`build_splits(config, seed)` loads a source and splits it; `StepLoader` iterates one rank's
micro-batches of each optimizer step; `build_eval_loader` shards evaluation sets without
padding. Nothing here imports ray, deepspeed or torch.distributed: ranks agree because every
choice is a pure function of (seed, epoch, step, index).
"""

from .loader import EvalLoader, StepLoader, build_eval_loader
from .sources import SOURCES, Splits
from .splits import build_splits
from .transforms import build_augmentation
from .types import ArrayDataset, DataInfo

__all__ = [
    "SOURCES",
    "ArrayDataset",
    "DataInfo",
    "EvalLoader",
    "Splits",
    "StepLoader",
    "build_augmentation",
    "build_eval_loader",
    "build_splits",
]
