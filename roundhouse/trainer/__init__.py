"""The training loop, the Task seam and built-in tasks, optimizers and losses.

Public entry point: `run_worker(job, ctx)` trains one worker. The run folder a job writes to
(`prepare_run`), its checkpoints and the weights a run starts from live in `roundhouse.weights`.
"""

from roundhouse.parallel.context import WorkerContext, build_local_context
from roundhouse.trainer.run import run_worker

__all__ = ["WorkerContext", "build_local_context", "run_worker"]
