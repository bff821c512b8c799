"""`trainer.ledger`: the loop's side of the sample ledger (see `roundhouse.runs.ledger`).

After each committed optimizer step the rank appends the dataset indices it trained in that
step; rank 0 records the epoch arithmetic once, and a resume point whenever training continues
from an earlier step than the ledger may already hold (a `--resume`, or live recovery).
"""

from __future__ import annotations

import logging
from typing import Any

from roundhouse.config import JobSpec
from roundhouse.errors import JobFileError
from roundhouse.runs.ledger import EpochPlan, LedgerWriter, live_lines, read_ledger
from roundhouse.runs.rundir import RunDir

logger = logging.getLogger(__name__)


def check_ledger_job(job: JobSpec) -> None:
    """`trainer.ledger` needs the in-memory training split (a streamed one has no indices) and
    plain data parallel (each rank its own share).

    Raises:
        JobFileError: the job streams its training data or splits the model over ranks.
    """
    if not job.trainer.ledger:
        return
    if job.data.train is not None:
        raise JobFileError(
            "trainer.ledger=true needs an in-memory training split, but data.train streams "
            "from shards",
            "set trainer.ledger=false, or use a data.source the loader holds in memory",
        )
    if getattr(job.strategy, "model_parallel_size", 1) > 1:
        raise JobFileError(
            "trainer.ledger=true records one share per data-parallel rank, but this strategy "
            "splits the model over several ranks",
            "set trainer.ledger=false, or train without pipeline/tensor parallel",
        )


class StepLedger:
    """Records what one rank trained, step by step.

    Args:
        run_dir: the run folder.
        rank: this worker's rank.
        loader: the training `StepLoader` (its `last_indices` and `plan` are read).
    """

    def __init__(self, run_dir: RunDir, rank: int, loader: Any) -> None:
        self.writer = LedgerWriter(run_dir, rank)
        self.loader = loader
        plan = loader.plan
        self.epoch_plan = EpochPlan(plan.num_samples, plan.global_batch_size, plan.num_steps)
        if rank == 0:
            self.writer.write_meta(self.epoch_plan)

    def rebind(self, rank: int, loader: Any) -> None:
        """After the group re-formed: this worker's new rank and loader."""
        self.writer.close()
        self.writer, self.loader = LedgerWriter(self.writer.run_dir, rank), loader

    def committed(self, *, epoch: int, global_step: int, world: int) -> None:
        """The step just yielded by the loader was applied: record its samples."""
        entry = {
            "e": epoch,
            "s": self.loader.last_step,
            "gs": global_step,
            "n": self.epoch_plan.step_size(self.loader.last_step),
            "w": world,
            "i": list(self.loader.last_indices),
        }
        self.writer.record(entry)

    def record_unrecorded(self, global_step: int) -> int:
        """After a worker was lost: record, as this rank, the samples of the committed step
        `global_step` that no rank recorded; how many.

        A worker killed after its step's gradient exchange but before its ledger line leaves
        its share trained (the survivors applied the summed gradient) and unrecorded. The
        step's samples are a function of the epoch and the step (`StepLoader.step_samples`),
        so the survivors' rank 0 records the rest. Local run folders only (an object store's
        lines are buffered per rank, so the others' recent lines cannot be read back), and
        not under dynamic data assignment (async ps), whose steps commit rank by rank, nor for
        streamed data.
        """
        samples_of = getattr(self.loader, "step_samples", None)  # a streamed loader has none
        if samples_of is None or getattr(self.loader, "claim", None) is not None:
            return 0
        if not self.writer.run_dir.is_local:
            return 0
        self.writer.flush()
        _, lines, resumes = read_ledger(self.writer.run_dir)
        kept, _ = live_lines(lines, resumes)
        step_lines = [line for line in kept if line["gs"] == global_step]
        if not step_lines:
            return 0
        first = step_lines[0]
        recorded = {i for line in step_lines for i in line["i"]}
        unrecorded = [i for i in samples_of(first["e"], first["s"]) if i not in recorded]
        if unrecorded:
            entry = {k: first[k] for k in ("e", "s", "gs", "n", "w")}
            self.writer.record({**entry, "i": unrecorded})
        return len(unrecorded)

    def resumed(self, global_step: int) -> None:
        """Training goes on from `global_step` (rank 0 only records it)."""
        if self.writer.rank == 0:
            self.writer.mark_resume(global_step)

    def close(self) -> None:
        """Flush and close this rank's file."""
        self.writer.close()


def build_step_ledger(job: JobSpec, run_dir: RunDir, rank: int, loader: Any) -> StepLedger | None:
    """The ledger of this rank when `trainer.ledger` is on, else None."""
    if not job.trainer.ledger:
        return None
    check_ledger_job(job)
    return StepLedger(run_dir, rank, loader)
