"""The public Task seam: what one objective owns, for the loop, the strategies and the commands.

A task turns batches into losses and metrics, names the optimizers it needs (over which
parameters, in which order per step), and says what `sample`, `export`, `--dry-run` and
`models summary` do. The built-in objectives (classification, language modelling, diffusion,
VAE, GAN) are subclasses; a user's own is any subclass, named in the job file as
`task: package.module:Class` (see docs/guide/tasks.md).

Strategies call `forward` and `loss` (under autocast, on their own wrapped model); the
evaluation loop adds `eval_sums` over batches and ranks and `finalize` turns sums into
metrics. A task with several optimizers writes `step_loss`: for each optimizer, in `order`,
the loop computes that loss with only that optimizer's parameters trainable, lets the strategy
exchange exactly their gradients, and steps that optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from roundhouse.errors import RoundhouseError

if TYPE_CHECKING:
    from roundhouse.config import JobSpec


class TaskError(RoundhouseError):
    """A task cannot be loaded, or cannot do what a command asks of it."""


@dataclass
class OptimizerSpec:
    """One optimizer a task needs.

    Attributes:
        name: Its name: the job file's `task.optimizers.<name>`, the metrics' suffix.
        params: Globs over parameter names (`fnmatch`); None: every trainable parameter no
            other optimizer names.
    """

    name: str
    params: list[str] | None = None


@dataclass
class ExampleInputs:
    """What `--dry-run`, `models summary` and `export` feed the model (shapes, not values)."""

    args: tuple[Tensor, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class of every objective. Subclasses implement at least `loss`.

    Attributes:
        metric: The validation metric (without `val/`) that early stopping and tune select on
            by default, and `metric_mode` its direction.
        can_sample: Whether `roundhouse sample` can draw from models of this task.
    """

    metric: ClassVar[str] = "loss"
    metric_mode: ClassVar[str] = "min"
    can_sample: ClassVar[bool] = False

    @classmethod
    def from_job(cls, job: JobSpec, **options: Any) -> Task:
        """Build the task for `job`; `options` are the job file's `task.options`."""
        return cls(**options)

    # --- the step ---------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's outputs for `batch` (what `loss` and `eval_sums` take)."""
        return model(batch["input"])

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The scalar training loss of one micro-batch (a mean over its samples)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def optimizers(self) -> list[OptimizerSpec]:
        """The optimizers this task steps, in their default per-step order (one by default)."""
        return [OptimizerSpec("main")]

    def step_loss(self, model: nn.Module, batch: dict[str, Tensor], optimizer: str) -> Tensor:
        """The loss whose gradients `optimizer` steps on (only its parameters are trainable)."""
        return self.loss(self.forward(model, batch), batch)

    # --- metrics ----------------------------------------------------------------------------

    def eval_sums(self, outputs: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Metric sums of one evaluation batch; they add up over batches and ranks."""
        count = torch.tensor(float(next(iter(batch.values())).shape[0]), device=outputs.device)
        return {"loss": self.loss(outputs, batch).detach().float() * count, "count": count}

    def finalize(self, sums: dict[str, float]) -> dict[str, float]:
        """Metrics (`loss`, ...) from the sums over every batch and rank."""
        return {"loss": float(sums["loss"]) / max(float(sums["count"]), 1.0)}

    def metric_names(self) -> tuple[str, ...]:
        """The metrics `finalize` returns (what `tune --metric` may name, as `val/<name>`);
        empty: not declared (tune falls back to its table by model family)."""
        return ()

    # --- what the commands ask --------------------------------------------------------------

    def example_inputs(
        self, input_shape: tuple[int, ...], dtype: torch.dtype, batch_size: int, device: Any
    ) -> ExampleInputs:
        """Inputs of the model's forward for shape checks, summaries and export."""
        shape = (batch_size, *input_shape)
        return ExampleInputs((torch.zeros(shape, dtype=dtype, device=device),))

    def export_module(self, model: nn.Module) -> nn.Module:
        """The module `export` writes (the whole model by default; a GAN writes its generator)."""
        return model

    def export_inputs(self, model: nn.Module, batch_size: int) -> ExampleInputs | None:
        """Inputs of `export_module` when they differ from the model's (None: the same)."""
        return None

    def sample(self, model: nn.Module, num: int, generator: torch.Generator) -> Tensor:
        """`num` samples from the model (images `(N, C, H, W)` in [0, 1] for image tasks).

        Raises:
            TaskError: The task cannot sample (`can_sample` is False).
        """
        raise TaskError(
            f"task {type(self).__name__} cannot sample",
            "sample a run of a generative task (gan, diffusion, vae, language_model)",
        )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a strategy's wrapper (a DeepSpeed engine's `module`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model
