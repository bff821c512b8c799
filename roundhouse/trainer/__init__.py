"""The training loop, strategies, optimizers, checkpoints and tracking.

Public entry points: `run_worker(job, ctx)` trains one worker; `prepare_run(job, resume)` binds
a job to its run folder (called once per job by the launcher).
"""

from roundhouse.parallel.context import WorkerContext, build_local_context
from roundhouse.trainer.run import PreparedRun, prepare_run, run_worker

__all__ = ["PreparedRun", "WorkerContext", "build_local_context", "prepare_run", "run_worker"]
