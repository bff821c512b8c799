"""`Topology`: one job at one world size, and the batch arithmetic every layer shares.

The launcher's checks, `--dry-run`, the driver's progress bar, the trainer's loaders and the
DeepSpeed config all read the data-parallel degree, the micro-batch, the accumulation and the
number of steps per epoch from here, so they can never disagree.

Batch arithmetic: each global batch of `data.batch_size` samples is cut into
`data_parallel * grad_accum_steps` near-equal micro-batches. Remainder rule for the last,
partial global batch of an epoch (`data.remainder_policy`): `drop` drops it; `partial` keeps it
only if it holds at least one sample per micro-batch (so no rank and no micro-batch is ever
empty); `pad` (streamed data) fills it up from the epoch's start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from roundhouse.config import JobSpec
from roundhouse.errors import JobFileError


def count_steps(num_samples: int, global_batch: int, num_chunks: int, remainder: str) -> int:
    """Optimizer steps in an epoch of `num_samples`.

    Args:
        num_samples: Training samples in the epoch.
        global_batch: Samples per optimizer step over all ranks.
        num_chunks: Micro-batches per optimizer step over all ranks (`dp * accumulation`).
        remainder: `drop`, `partial` or `pad` (see the module docstring).

    Returns:
        The number of steps, identical on every rank.
    """
    if remainder == "pad":
        return -(-num_samples // global_batch)
    full, rest = divmod(num_samples, global_batch)
    keep_partial = remainder == "partial" and rest >= num_chunks
    return full + (1 if keep_partial else 0)


@dataclass(frozen=True)
class Topology:
    """How a job's `world_size` workers divide the model and the global batch.

    Attributes:
        world_size: Worker processes.
        pipeline_stages: Pipeline-parallel stages (1 without pipeline parallel).
        tensor_parallel: Tensor-parallel degree (1 without tensor parallel).
        expert_parallel: Expert-parallel degree (1 without; experts are split inside each
            data-parallel group, so it changes no batch arithmetic).
        global_batch: `data.batch_size`, samples per optimizer step over all ranks.
        grad_accum_steps: Micro-batches per optimizer step on each data-parallel rank.
        remainder: `drop`, `partial` or `pad`: the rule for an epoch's last partial batch.
    """

    world_size: int
    pipeline_stages: int
    tensor_parallel: int
    global_batch: int
    grad_accum_steps: int
    remainder: str
    expert_parallel: int = 1

    @classmethod
    def of_job(cls, job: JobSpec, world_size: int) -> Topology:
        """The topology of `job` on `world_size` workers (not yet checked: see `check`)."""
        return cls.of_section(
            job.strategy,
            world_size,
            global_batch=job.data.batch_size,
            grad_accum_steps=job.trainer.grad_accum_steps,
            remainder=job.data.remainder_policy,
        )

    @classmethod
    def of_section(
        cls,
        strategy: Any,
        world_size: int,
        *,
        global_batch: int,
        grad_accum_steps: int,
        remainder: str = "drop",
    ) -> Topology:
        """The topology a `strategy` section gives a batch on `world_size` workers.

        A section states its model-parallel degrees as fields (`pipeline_stages`,
        `tensor_parallel`, `expert_parallel`); one without them is pure data parallel.
        """
        return cls(
            world_size=world_size,
            pipeline_stages=getattr(strategy, "pipeline_stages", 1),
            tensor_parallel=getattr(strategy, "tensor_parallel", 1),
            global_batch=global_batch,
            grad_accum_steps=grad_accum_steps,
            remainder=remainder,
            expert_parallel=getattr(strategy, "expert_parallel", 1),
        )

    @property
    def model_parallel(self) -> int:
        """Workers holding one copy of the model: `pipeline_stages * tensor_parallel`."""
        return self.pipeline_stages * self.tensor_parallel

    @property
    def data_parallel(self) -> int:
        """Data-parallel ranks: replicas of the model, each taking its share of a batch."""
        return max(1, self.world_size // self.model_parallel)

    @property
    def num_chunks(self) -> int:
        """Micro-batches per optimizer step over all data-parallel ranks."""
        return self.data_parallel * self.grad_accum_steps

    @property
    def drop_last(self) -> bool:
        """Whether an in-memory loader drops the last partial batch (`remainder == drop`)."""
        return self.remainder == "drop"

    @property
    def micro_batch_exact(self) -> float:
        """Samples per micro-batch, as a fraction when the batch does not divide evenly."""
        return self.global_batch / self.num_chunks

    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch, rounded down (at least 1): DeepSpeed's figure."""
        return max(1, self.global_batch // self.num_chunks)

    def micro_batch_text(self) -> str:
        """The micro-batch for people: `8`, or `7-8` when micro-batches differ by one."""
        micro = self.micro_batch_exact
        return f"{micro:g}" if micro.is_integer() else f"{math.floor(micro)}-{math.ceil(micro)}"

    def steps_per_epoch(self, num_samples: int) -> int:
        """Optimizer steps in an epoch of `num_samples` training samples."""
        return count_steps(num_samples, self.global_batch, self.num_chunks, self.remainder)

    def check(self) -> Topology:
        """Raise `JobFileError` when the layout does not add up; return self.

        Raises:
            JobFileError: The model-parallel size does not divide the world size, or the
                global batch is smaller than data-parallel ranks x accumulation steps.
        """
        if self.world_size % self.model_parallel:
            raise JobFileError(
                f"pipeline_stages x tensor_parallel = {self.model_parallel} does not divide the "
                f"world size {self.world_size}",
                "make cluster.num_workers a multiple of pipeline_stages * tensor_parallel",
            )
        return self

    def check_batch(self) -> Topology:
        """Raise `JobFileError` when a global batch cannot give every micro-batch a sample.

        Raises:
            JobFileError: `data.batch_size` is smaller than data-parallel ranks x accumulation.
        """
        dp, accum = self.data_parallel, self.grad_accum_steps
        if self.global_batch < dp * accum:
            raise JobFileError(
                f"data.batch_size={self.global_batch} is smaller than data-parallel ranks x "
                f"accumulation steps = {dp} x {accum} = {dp * accum}",
                "raise data.batch_size or lower trainer.grad_accum_steps",
            )
        return self


def compute_total_steps(job: JobSpec, steps_per_epoch: int) -> int:
    """Optimizer steps the run will take: the smaller of max_steps and max_epochs' worth."""
    limits = []
    if job.trainer.max_steps is not None:
        limits.append(job.trainer.max_steps)
    if job.trainer.max_epochs is not None:
        limits.append(job.trainer.max_epochs * steps_per_epoch)
    return min(limits)
