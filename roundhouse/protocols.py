"""The seams of roundhouse: every public extension point, in one place.

As torchtitan's `protocols/` does, this module names what a user or a contributor extends,
and where it is registered. Everything else in the package is implementation: import these
names from here, and the rest may move without breaking an extension.

- `Strategy` (with `StepTask`, `TrainPlan`, `StepStats` and `WorkerContext`): one way of
  computing gradients and updating parameters on a worker. A new parallelism mode is one
  package under `roundhouse/parallel/` and one line in `parallel/registry.py: STRATEGIES`.
  Its job-file section subclasses `StrategySection` with `kind: Literal["<kind>"]`; defining
  the class adds it to the `strategy` union of the job schema.
- `ModelSpec` (with `BuildConfig`): a registered model, `models.register(ModelSpec(...))`,
  with a `debug` flavor and a `build(config) -> nn.Module`. `torchvision:<name>` and
  `module.path:callable` adapt outside models without registering.
- `Task`: how a model's outputs become a loss and evaluation metrics (`forward`, `loss`,
  `eval_sums`, `finalize`). A `ModelSpec.loss` names its task; strategies see only the
  `StepTask` part (`forward`, `loss`).
- `ParameterStore`: what the `ps` strategy talks to (`pull`, `push`, ...). `cluster/` implements
  it with Ray actors; an in-process implementation serves `--local`.
- `Tracker`: where a run's metrics go (`metrics.jsonl`, W&B, the console); the loop calls
  `log(metrics, step=, epoch=)` on every rank and only rank 0 writes.
- `preflight` and `Report`: the checks every command runs before it starts anything; a new
  check is one function in `trainer/checks.py: CHECKS`.
"""

from __future__ import annotations

from roundhouse.config.strategy_section import StrategySection
from roundhouse.models.spec import BuildConfig, ModelSpec
from roundhouse.parallel.base import StepStats, StepTask, Strategy, TrainPlan
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.ps.protocol import ParameterStore
from roundhouse.runs.tracking import Tracker
from roundhouse.trainer.preflight import Report, preflight
from roundhouse.trainer.task import Task

__all__ = [
    "BuildConfig",
    "ModelSpec",
    "ParameterStore",
    "Report",
    "StepStats",
    "StepTask",
    "Strategy",
    "StrategySection",
    "Task",
    "Tracker",
    "TrainPlan",
    "WorkerContext",
    "preflight",
]
