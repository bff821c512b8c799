"""Index arithmetic: seeds, epoch orders and which samples each rank takes at each step.

Everything here is a pure function of integers, so every rank (and a resumed run) computes the
same answer without talking to the others.

Batch arithmetic: an epoch is a sequence of *global* batches of `global_batch_size` samples taken
in order from the epoch's permutation. Each global batch is cut into
`world_size * grad_accum_steps` near-equal chunks (like `numpy.array_split`, in order); rank `r`
runs chunks `r * A .. r * A + A - 1` as its micro-batches. Concatenating all ranks' micro-batches
in (rank, micro) order gives back the global batch, so N processes on their shards see exactly
what one process sees on the whole batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from roundhouse.config.topology import Topology, count_steps
from roundhouse.errors import DataError

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1

# Stream tags keep the seeds of unrelated random choices apart, so that, say, the split
# permutation never equals the epoch-0 shuffle for the same user seed.
SPLIT_STREAM = 1
SHUFFLE_STREAM = 2
AUGMENT_STREAM = 3
MIXUP_STREAM = 4
SYNTHETIC_STREAM = 5


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def derive_seed(*parts: int) -> int:
    """Mixes integers into one seed for `torch.manual_seed` or a `torch.Generator`.

    Python's `hash` is not promised to be stable across versions, and a seed must be identical
    on every worker and after a resume, so this is an explicit splitmix64 chain.

    Args:
        *parts: Any integers (negative ones are fine), e.g. `(seed, epoch, SHUFFLE_STREAM)`.

    Returns:
        A non-negative integer below 2**63.
    """
    state = 0
    for part in parts:
        state = _splitmix64(state ^ (int(part) & _MASK64))
    return state >> 1


def seeded_generator(*parts: int) -> torch.Generator:
    """Returns a CPU `torch.Generator` seeded with `derive_seed(*parts)`."""
    generator = torch.Generator()
    generator.manual_seed(derive_seed(*parts))
    return generator


def epoch_order(num_samples: int, *, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global sample order of one epoch, a function of (seed, epoch) only.

    Args:
        num_samples: Dataset length.
        seed: Run seed.
        epoch: Epoch number.
        shuffle: False gives the identity order.

    Returns:
        An int64 tensor holding a permutation of `range(num_samples)`.
    """
    if not shuffle:
        return torch.arange(num_samples)
    return torch.randperm(num_samples, generator=seeded_generator(seed, epoch, SHUFFLE_STREAM))


def chunk_bounds(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """Splits `range(length)` into `num_chunks` contiguous near-equal parts, in order.

    The first `length % num_chunks` parts get one extra element, exactly as
    `numpy.array_split` does.

    Returns:
        `(start, end)` pairs covering `range(length)`.
    """
    base, extra = divmod(length, num_chunks)
    bounds = []
    for k in range(num_chunks):
        start = k * base + min(k, extra)
        bounds.append((start, start + base + (1 if k < extra else 0)))
    return bounds


@dataclass(frozen=True)
class BatchPlan:
    """How one epoch of `num_samples` is cut into global steps and per-rank micro-batches.

    Remainder policy: the last global batch may be partial. `drop_last=True` drops it;
    `drop_last=False` keeps it only if it holds at least `world_size * grad_accum_steps`
    samples, so that no rank and no micro-batch is ever empty; a smaller remainder is dropped.

    Raises:
        DataError: On non-positive sizes, a rank out of range, or a global batch smaller than
            `world_size * grad_accum_steps`.
    """

    num_samples: int
    global_batch_size: int
    world_size: int
    grad_accum_steps: int
    drop_last: bool
    # Exact mode: the global batch is cut into this many shards whatever the world size, and
    # each rank takes a contiguous run of them (`chunk_bounds(V, world_size)`).
    virtual_shards: int | None = None

    @classmethod
    def of_topology(cls, num_samples: int, topology: Topology) -> BatchPlan:
        """The plan of an epoch of `num_samples` over `topology`'s data-parallel ranks."""
        return cls(
            num_samples,
            topology.global_batch,
            topology.data_parallel,
            topology.grad_accum_steps,
            topology.drop_last,
        )

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "world_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise DataError(f"{name} must be positive, got {getattr(self, name)}")
        if self.virtual_shards is not None and self.virtual_shards < self.world_size:
            raise DataError(
                f"{self.virtual_shards} virtual shards cannot feed {self.world_size} ranks",
                "raise strategy.virtual_shards to at least the number of workers",
            )
        if self.global_batch_size < self.num_chunks:
            raise DataError(
                f"global batch size {self.global_batch_size} is smaller than world_size * "
                f"grad_accum_steps = {self.world_size} * {self.grad_accum_steps}",
                "raise data.batch_size or lower trainer.grad_accum_steps / the number of workers",
            )

    @property
    def num_chunks(self) -> int:
        """Micro-batches per global step over all ranks (the virtual shards, if set)."""
        return self.virtual_shards or self.world_size * self.grad_accum_steps

    @property
    def num_steps(self) -> int:
        """Optimizer steps in one epoch (identical on every rank)."""
        remainder = "drop" if self.drop_last else "partial"
        return count_steps(self.num_samples, self.global_batch_size, self.num_chunks, remainder)

    def step_bounds(self, step: int) -> tuple[int, int]:
        """Positions `[start, end)` of global step `step` in the epoch order."""
        start = step * self.global_batch_size
        return start, min(start + self.global_batch_size, self.num_samples)

    def micro_bounds(self, step: int, rank: int) -> list[tuple[int, int]]:
        """Positions in the epoch order of `rank`'s micro-batches at global step `step`."""
        start, end = self.step_bounds(step)
        chunks = chunk_bounds(end - start, self.num_chunks)
        if self.virtual_shards is not None:
            lo, hi = chunk_bounds(self.virtual_shards, self.world_size)[rank]
            mine = chunks[lo:hi]
        else:
            mine = chunks[rank * self.grad_accum_steps : (rank + 1) * self.grad_accum_steps]
        return [(start + lo, start + hi) for lo, hi in mine]


def eval_share(num_samples: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous share of an evaluation set.

    The shares of all ranks cover every sample exactly once (no padding, no duplicates); a
    rank's share may be empty when there are fewer samples than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    start, end = chunk_bounds(num_samples, world_size)[rank]
    return range(start, end)
