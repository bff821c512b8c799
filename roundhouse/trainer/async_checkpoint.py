"""Checkpoint savers: write now, or snapshot now and write in the background.

`trainer.checkpoint.async: true` makes the loop wait only for a CPU copy of the state (the
snapshot); a background thread serialises it and commits it with the `Checkpointer`'s atomic
manifest (the state file, then its manifest, then `latest`), locally or to any fsspec URL. At
most one save is in flight: the next save first waits for the previous commit, and the end of
the run waits for the writer. A process killed mid-write leaves a folder without a manifest,
which is invisible, so `latest` stays on the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch

from roundhouse.weights.checkpoint import Checkpointer

logger = logging.getLogger(__name__)


def cpu_snapshot(value: Any, reuse: Any = None) -> Any:
    """A deep copy of `value` whose tensors are CPU copies (safe from in-place updates).

    `reuse`: an earlier snapshot no longer in use; its tensors of the same shape and dtype
    are written over instead of allocating new ones (a fresh allocation page-faults its
    memory in, several times the cost of the copy itself).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if (
            isinstance(reuse, torch.Tensor)
            and reuse.shape == value.shape
            and reuse.dtype == value.dtype
            and not value.is_sparse
        ):
            return reuse.copy_(value)
        return value.to("cpu", copy=True)
    if isinstance(value, dict):
        old = reuse if isinstance(reuse, dict) else {}
        return {k: cpu_snapshot(v, old.get(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        old = reuse if isinstance(reuse, list | tuple) and len(reuse) == len(value) else None
        copies = [cpu_snapshot(v, old[i] if old else None) for i, v in enumerate(value)]
        return copies if isinstance(value, list) else tuple(copies)
    return value  # numbers, strings, None: immutable


class SyncSaver:
    """Writes each checkpoint before returning (the default)."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self.last_block_s = 0.0  # how long the loop waited in the last `save`

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write checkpoint `step` now."""
        started = time.perf_counter()
        self.checkpointer.save(step, state, meta)
        self.last_block_s = time.perf_counter() - started

    def wait(self) -> None:
        """Nothing is ever in flight."""

    def close(self) -> None:
        """Nothing to stop."""


class AsyncSaver(SyncSaver):
    """Snapshots in the caller's thread, commits in one background thread, one save at a time.

    A failed background write is raised by the next `save`, `wait` or `close`. The last
    snapshot stays in memory between saves: the next one copies into its tensors.
    """

    def __init__(self, checkpointer: Checkpointer) -> None:
        super().__init__(checkpointer)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.previous: Any = None  # the last snapshot, committed: its buffers are reused

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Wait for the previous commit, snapshot `state`, and start writing it."""
        started = time.perf_counter()
        self.wait()
        snapshot = self.previous = cpu_snapshot(state, self.previous)
        self.thread = threading.Thread(
            target=self._commit, args=(step, snapshot, dict(meta)), name="checkpoint-writer"
        )
        # Not a daemon: the interpreter finishes a commit before it exits.
        self.thread.start()
        self.last_block_s = time.perf_counter() - started

    def _commit(self, step: int, snapshot: dict[str, Any], meta: dict[str, Any]) -> None:
        try:
            self.checkpointer.save(step, snapshot, meta)
        except BaseException as exc:  # handed to the loop's thread at the next wait
            self.error = exc

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its failure."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def close(self) -> None:
        """Wait for the writer (the run's end)."""
        self.wait()


def build_saver(checkpointer: Checkpointer, asynchronous: bool) -> SyncSaver:
    """`AsyncSaver` for `trainer.checkpoint.async`, else `SyncSaver`."""
    return AsyncSaver(checkpointer) if asynchronous else SyncSaver(checkpointer)
