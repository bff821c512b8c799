"""Per-rank loaders: `StepLoader` for training (one item per optimizer step) and the evaluation
loader.

See `roundhouse.data.sampler` for the batch arithmetic. The training loader is resumable to the
step: its position is `{"epoch", "steps_done"}`, and the order of an epoch depends only on
(seed, epoch), so a run can resume at another world size and see the same global batches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from roundhouse.config import AugmentConfig
from roundhouse.config.topology import Topology
from roundhouse.errors import DataError

from .sampler import BatchPlan, chunk_bounds, epoch_order, eval_share
from .transforms import apply_mixup, build_augmentation, draw_mixup
from .types import ArrayDataset

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]

# `claim(epoch, first, limit)`: the next unclaimed chunk number of `epoch` (chunks `first ..
# limit - 1`, the first claim of an epoch starting at `first`), or -1 when none is left.
ClaimFn = Callable[[int, int, int], int]


@dataclass(frozen=True)
class _StepPlan:
    """This rank's share of one global step: dataset indices per micro-batch.

    With mixup, each micro-batch's index list is its own samples followed by their partners.
    """

    step: int
    step_size: int
    micro_indices: list[list[int]]
    lam: float | None
    chunk: int  # step * world_size + rank: which rank's share of the step this is
    # A step taken over after live recovery (`StepLoader.take_over`): the samples this rank
    # trained in the attempt that failed, whose gradients it kept.
    kept: tuple[int, ...] = ()

    @property
    def own_indices(self) -> list[int]:
        """The samples this share trains (without mixup partners), in micro-batch order,
        after those kept from a failed attempt of the step."""
        if self.lam is None:
            return [*self.kept, *(i for micro in self.micro_indices for i in micro)]
        return [*self.kept, *(i for micro in self.micro_indices for i in micro[: len(micro) // 2])]


def _identity(batch: Batch) -> Batch:
    # Module level so DataLoader workers can pickle it; __getitems__ already built the batch.
    return batch


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")


class StepLoader:
    """Iterates one epoch of *optimizer steps* for one data-parallel rank.

    Each item is a list of `grad_accum_steps` micro-batches, `{"input": (b, ...), "target":
    (b,)}`: this rank's share of one global batch. Global step `i` of an epoch takes positions
    `[i * B, (i + 1) * B)` of the epoch order (a permutation seeded by (seed, epoch), or the
    identity without shuffle); the global batch is cut into `world_size * grad_accum_steps`
    near-equal chunks in order and this rank gets chunks `rank * A .. rank * A + A - 1`.
    `last_step_size` holds the global batch size of the step just yielded, `last_indices` the
    dataset indices this rank trains in it.

    Remainder policy: a last, partial global batch is dropped with `drop_last=True`; with
    `drop_last=False` it is kept if it has at least `world_size * grad_accum_steps` samples (so no
    micro-batch is empty) and dropped otherwise. `len()` counts exactly the steps yielded.

    Augmentation is seeded per sample by (seed, epoch, index) and mixup per global step by
    (seed, epoch, step), pairing samples across the whole global batch, so batches do not depend
    on world size, worker count or resume point. Mixed micro-batches also carry `"target_b"`
    `(b,)` and `"mix_lam"` (a 0-dim float tensor).

    Dynamic assignment (`claim` given; the `ps` strategy's async mode): the epoch's
    `len() * world_size` chunks (chunk `c` is rank `c % world_size`'s share of global step
    `c // world_size`) are handed out one at a time by `claim`, shared by every rank, so a fast
    rank takes more of them than a slow one and the epoch ends when all are taken. The batches
    are the same as in static assignment; only who trains on them changes. `steps_done` is
    then the number of global steps whose chunks were all claimed (as far as this rank knows),
    and an iteration that ends normally has done the whole epoch.

    Args:
        dataset: The training split.
        global_batch_size: Samples per optimizer step over all ranks.
        rank: This rank.
        world_size: Number of data-parallel ranks.
        grad_accum_steps: Micro-batches per optimizer step on each rank.
        seed: Run seed (shuffle, augmentation, mixup).
        shuffle: Permute the samples each epoch.
        drop_last: Drop the last partial global batch (see the remainder policy).
        num_workers: DataLoader worker processes; 0 fetches in this process.
        augment: Per-sample augmentation; None or all-off for none.
        mixup_alpha: Beta(alpha, alpha) mixup; 0 falls back to `augment.mixup_alpha`.
        claim: Dynamic assignment's shared chunk counter (see above); None for static.
        virtual_shards: Exact mode: cut each global batch into this many micro-batches
            whatever the world size; this rank takes its contiguous run of them
            (`chunk_bounds(virtual_shards, world_size)[rank]`) instead of `grad_accum_steps`.

    Raises:
        DataError: On bad sizes, including a global batch smaller than
            `world_size * grad_accum_steps` or an epoch with no step at all.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        global_batch_size: int,
        rank: int,
        world_size: int,
        grad_accum_steps: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        num_workers: int = 0,
        augment: AugmentConfig | None = None,
        mixup_alpha: float = 0.0,
        claim: ClaimFn | None = None,
        virtual_shards: int | None = None,
    ) -> None:
        self.plan = BatchPlan(
            len(dataset), global_batch_size, world_size, grad_accum_steps, drop_last, virtual_shards
        )
        _check_rank(rank, world_size)
        self._check_options(num_workers, mixup_alpha)
        self.rank, self.seed, self.shuffle, self.num_workers = rank, seed, shuffle, num_workers
        self.world_size, self.claim = world_size, claim
        self.mixup_alpha = mixup_alpha or (augment.mixup_alpha if augment is not None else 0.0)
        transform = (
            build_augmentation(augment, dataset.input_shape) if augment is not None else None
        )
        self.dataset = dataset.with_transform(transform, seed)
        self.last_step_size = 0
        self.last_indices: list[int] = []  # the samples of the step just yielded (the ledger)
        self.last_step = -1  # its step number in the epoch
        self._epoch, self._steps_done, self._resume_at = 0, 0, 0
        # live recovery's next step: (epoch, step, its micro-batches' position runs, kept)
        self._taken_over: tuple[int, int, list[list[tuple[int, int]]], tuple[int, ...]] | None
        self._taken_over = None

    @classmethod
    def of_topology(
        cls, dataset: ArrayDataset, topology: Topology, *, rank: int, **options: Any
    ) -> StepLoader:
        """The loader of data-parallel rank `rank` over `topology` (its global batch, its
        data-parallel ranks, accumulation and remainder rule); `options` as `__init__` takes
        them (seed, shuffle, augmentation, ...)."""
        return cls(
            dataset,
            global_batch_size=topology.global_batch,
            rank=rank,
            world_size=topology.data_parallel,
            grad_accum_steps=topology.grad_accum_steps,
            drop_last=topology.drop_last,
            **options,
        )

    def _check_options(self, num_workers: int, mixup_alpha: float) -> None:
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if mixup_alpha < 0:
            raise DataError(f"mixup alpha must be >= 0, got {mixup_alpha}")
        if self.plan.num_steps == 0:
            raise DataError(
                f"{self.plan.num_samples} training samples make no step of global batch size "
                f"{self.plan.global_batch_size} (drop_last={self.plan.drop_last})",
                "lower data.batch_size or set data.drop_last to false",
            )

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch to iterate; a new epoch starts at step 0.

        Setting the epoch that `load_state_dict` restored keeps the restored position.
        """
        if epoch != self._epoch:
            self._epoch, self._steps_done, self._resume_at = epoch, 0, 0

    def __len__(self) -> int:
        """Optimizer steps in one full epoch (the same on every rank)."""
        return self.plan.num_steps

    def state_dict(self) -> dict[str, int]:
        """The position: `{"epoch", "steps_done"}` (steps yielded so far in this epoch)."""
        return {"epoch": int(self._epoch), "steps_done": int(self._steps_done)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position; the next iteration yields only the remaining steps."""
        try:
            epoch, steps_done = int(state["epoch"]), int(state["steps_done"])
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"bad data loader state {state!r}: {err}") from err
        if steps_done < 0:
            raise DataError(f"bad data loader state {state!r}: negative steps_done")
        self._epoch, self._steps_done, self._resume_at = epoch, steps_done, steps_done

    def __iter__(self) -> Iterator[list[Batch]]:
        start, self._resume_at = self._resume_at, 0
        epoch, self._steps_done = self._epoch, start
        self.dataset.set_epoch(epoch)
        # Each plan is made once (a claim must not be made twice) and remembered until its
        # micro-batches come back from the fetcher, which may run ahead (DataLoader workers).
        planned: deque[_StepPlan] = deque()

        def index_lists() -> Iterator[list[int]]:
            for plan in self._plans(epoch, start):
                planned.append(plan)
                yield from plan.micro_indices

        fetched = self._fetch(index_lists())
        for first in fetched:
            plan = planned.popleft()
            rest = [next(fetched) for _ in plan.micro_indices[1:]]
            micro_batches = [self._finish(batch, plan) for batch in [first, *rest]]
            self._steps_done, self.last_step_size = plan.step + 1, plan.step_size
            self.last_indices, self.last_step = plan.own_indices, plan.step
            if self.claim is not None:
                self._steps_done = plan.chunk // self.world_size
            yield micro_batches
        self._steps_done = self.plan.num_steps

    def step_samples(self, epoch: int, step: int) -> list[int]:
        """Every sample of global step `step` of `epoch` (all ranks' shares; no mixup
        partners): what the step trains at any world size."""
        order = epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        first, end = self.plan.step_bounds(step)
        return order[first:end].tolist()

    def take_over(self, step: int, lost: list[int], world_size: int, kept: list[int]) -> bool:
        """Live recovery: make the next step yielded, step `step` of the current epoch (this
        loader's position), only this rank's part of what the `lost` ranks of the failed
        attempt at `world_size` ranks had to train; this rank keeps its own share's gradients
        (`kept`: its samples). The lost shares, in rank order, are cut into one contiguous
        part per rank of this loader, and each part into micro-batches no larger than the
        failed attempt's. False (the whole step is redone) under dynamic assignment or exact
        mode, or when the lost shares hold fewer samples than there are ranks now."""
        if self.claim is not None or self.plan.virtual_shards is not None:
            return False
        old = dataclasses.replace(self.plan, world_size=world_size)
        bounds = [b for rank in sorted(lost) for b in old.micro_bounds(step, rank)]
        positions = [p for lo, hi in bounds for p in range(lo, hi)]
        if not bounds or len(positions) < self.world_size:
            return False
        lo, hi = chunk_bounds(len(positions), self.world_size)[self.rank]
        mine = positions[lo:hi]
        largest = max(b - a for a, b in bounds)
        parts = chunk_bounds(len(mine), -(-len(mine) // largest))
        micro = [contiguous_runs(mine[a:b]) for a, b in parts]
        self._taken_over = (self._epoch, step, micro, tuple(kept))
        return True

    def _plans(self, epoch: int, start: int) -> Iterator[_StepPlan]:
        order = epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, shuffle=self.shuffle)
        taken, self._taken_over = self._taken_over, None
        if taken is not None and taken[:2] == (epoch, start):
            yield self._plan_positions(order, epoch, start, taken[2], start, kept=taken[3])
            start += 1
        if self.claim is None:
            for step in range(start, self.plan.num_steps):
                yield self._plan_step(order, epoch, step, self.rank)
            return
        width = self.world_size
        while (chunk := self.claim(epoch, start * width, self.plan.num_steps * width)) >= 0:
            yield self._plan_step(order, epoch, *divmod(chunk, width))

    def _plan_step(self, order: Tensor, epoch: int, step: int, rank: int) -> _StepPlan:
        runs = [[bounds] for bounds in self.plan.micro_bounds(step, rank)]
        return self._plan_positions(order, epoch, step, runs, step * self.world_size + rank)

    def _plan_positions(
        self,
        order: Tensor,
        epoch: int,
        step: int,
        runs: list[list[tuple[int, int]]],
        chunk: int,
        kept: tuple[int, ...] = (),
    ) -> _StepPlan:
        """The plan of micro-batches at `runs` (per micro-batch, `[lo, hi)` position runs in
        the epoch order) of global step `step`; with mixup, each sample's partner is drawn
        over the whole step."""
        first, end = self.plan.step_bounds(step)
        micro = [_at_runs(order, at) for at in runs]
        if self.mixup_alpha == 0:
            return _StepPlan(step, end - first, micro, None, chunk, kept)
        draw = draw_mixup(self.mixup_alpha, end - first, seed=self.seed, epoch=epoch, step=step)
        partners = order[first + draw.partners]
        for own, at in zip(micro, runs, strict=True):
            own.extend(_at_runs(partners, at, first))
        return _StepPlan(step, end - first, micro, draw.lam, chunk, kept)

    def _fetch(self, index_lists: Iterator[list[int]]) -> Iterator[Batch]:
        """Raw micro-batches in order, fetched here or by DataLoader workers."""
        if self.num_workers == 0:
            return (self.dataset.__getitems__(indices) for indices in index_lists)
        # Not persistent: workers copy the dataset when the iterator starts, so the epoch just
        # set above is the one they augment with.
        loader = DataLoader(
            self.dataset,
            batch_sampler=index_lists,
            collate_fn=_identity,
            num_workers=self.num_workers,
        )
        return iter(loader)

    @staticmethod
    def _finish(batch: Batch, plan: _StepPlan) -> Batch:
        if plan.lam is None:
            return batch
        half = batch["target"].shape[0] // 2
        own = {key: value[:half] for key, value in batch.items()}
        partner = {key: value[half:] for key, value in batch.items()}
        return apply_mixup(own, partner, plan.lam)


def _at_runs(values: Tensor, runs: list[tuple[int, int]], offset: int = 0) -> list[int]:
    """`values` at the `[lo, hi)` position runs (positions counted from `offset`), in order."""
    if not runs:
        return []
    return torch.cat([values[lo - offset : hi - offset] for lo, hi in runs]).tolist()


def contiguous_runs(positions: list[int]) -> list[tuple[int, int]]:
    """Ascending `positions` as `[lo, hi)` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs


class EvalLoader:
    """Deterministic evaluation batches of one rank's contiguous share of a dataset.

    Over all ranks every sample appears exactly once (no padding, no duplicates), so metrics
    summed across ranks are exact. Ranks may differ by one batch, so do not run a collective
    per batch. Never augmented.
    """

    def __init__(self, dataset: ArrayDataset, *, batch_size: int, rank: int, world_size: int):
        if batch_size < 1:
            raise DataError(f"evaluation batch size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.share = eval_share(len(dataset), rank, world_size)

    def __len__(self) -> int:
        return -(-len(self.share) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(self.share.start, self.share.stop, self.batch_size):
            end = min(start + self.batch_size, self.share.stop)
            # Copies, so a caller that works in place cannot corrupt the stored split; read
            # from the stored tensors, so the training augmentation never applies.
            yield {
                "input": self.dataset.inputs[start:end].clone(),
                "target": self.dataset.targets[start:end].clone(),
            }


def build_eval_loader(
    dataset: ArrayDataset, *, batch_size: int, rank: int, world_size: int
) -> EvalLoader:
    """Builds rank `rank`'s evaluation loader; see `EvalLoader`."""
    return EvalLoader(dataset, batch_size=batch_size, rank=rank, world_size=world_size)
