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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from roundhouse.errors import RoundhouseError

if TYPE_CHECKING:
    from roundhouse.config import JobSpec
    from roundhouse.data import DataInfo


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


# `roundhouse sample`'s flag for each `SampleRequest` field (the others: `--<field-name>`).
SAMPLE_FLAGS = {"class_label": "--class"}


@dataclass
class SampleRequest:
    """What `roundhouse sample` asks of a task: its flags, None where not given.

    A task takes the fields in its `sample_options`; `Task.check_sample` refuses the others
    before the run's weights are read.
    """

    seed: int = 0
    num: int | None = None
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    guidance: float | None = None
    class_label: int | None = None
    prompt: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    beam: int | None = None

    def given(self) -> list[str]:
        """The fields given (not None), seed aside."""
        return [k for k, v in vars(self).items() if k != "seed" and v is not None]

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of field `name`."""
        return SAMPLE_FLAGS.get(name, "--" + name.replace("_", "-"))


@dataclass
class ExampleInputs:
    """Inputs of a model's (or an exported module's) forward: what `--dry-run`, `models
    summary` and `export` feed it.

    Attributes:
        args: The positional inputs, batch first.
        kwargs: Keyword inputs (the shape check passes them; summaries and export do not).
        names: One name per positional input (export's ONNX input names; the reports'
            labels). Empty: `input` for one input, `input`, `input_1`, ... for several.
        dynamic_axes: Export's `{name: {axis: label}}` for the inputs and `output`. None: the
            batch axis (0) of every input and of the output.
    """

    args: tuple[Tensor, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    names: tuple[str, ...] = ()
    dynamic_axes: dict[str, dict[int, str]] | None = None

    def input_names(self) -> list[str]:
        """`names`, or the default names of the positional inputs."""
        if self.names:
            return list(self.names)
        return ["input", *(f"input_{i}" for i in range(1, len(self.args)))]

    def describe(self) -> str:
        """`input (1, 8, 8)`, or `inputs src (16,), tgt (15,)`: per-sample shapes, for reports."""
        shapes = [tuple(t.shape[1:]) for t in self.args]
        shapes += [tuple(t.shape[1:]) for t in self.kwargs.values() if isinstance(t, Tensor)]
        if len(shapes) == 1 and not self.names:
            return f"input {shapes[0]}"
        names = [*self.input_names(), *self.kwargs]
        return "inputs " + ", ".join(f"{n} {s}" for n, s in zip(names, shapes, strict=False))


@dataclass
class ExportGraph:
    """One file `export` writes: a module to trace and how to make its inputs.

    Attributes:
        module: The module torch.onnx traces (in eval mode).
        sample: `sample(batch, generator, variant)` -> the module's positional inputs for
            `batch` rows; `variant` > 0 asks for the other sizes the parity check tries (a
            language model: a shorter sequence).
        input_names: One name per input.
        dynamic_axes: torch.onnx's `{name: {axis: label}}` for the inputs and the output.
        kind: What was exported, for the report (`classifier`, `generator`, ...).
        scored: True when the output is logits over the test split's targets (export then
            reports the int8 file's test accuracy).
        part: A model exported as several files: this file's name suffix (None: one file).
    """

    module: nn.Module
    sample: Callable[..., tuple[Tensor, ...]]
    input_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    kind: str
    scored: bool
    part: str | None = None


def random_like(example: Tensor, generator: torch.Generator, high: int) -> Tensor:
    """Values for an input shaped like `example`: uniform [0, 1) floats, or ints below `high`."""
    if example.dtype.is_floating_point:
        return torch.rand(example.shape, generator=generator).to(example.dtype)
    return torch.randint(0, high, example.shape, generator=generator, dtype=example.dtype)


class Task:
    """Base class of every objective. Subclasses implement at least `loss`.

    Attributes:
        metric: The validation metric (without `val/`) that early stopping and tune select on
            by default, and `metric_mode` its direction.
        can_sample: Whether `roundhouse sample` can draw from models of this task.
        sample_kind: What `sample_output` returns: `images` (a PNG grid) or `text` (printed).
        sample_options: The `SampleRequest` fields (`roundhouse sample` flags) it takes.
        export_kind: What `export` calls the module it writes (`classifier`, `generator`, ...).
        export_scored: Whether the exported module's output is logits over the data's targets
            (then `export --quantize int8` reports the test accuracy before and after).
    """

    metric: ClassVar[str] = "loss"
    metric_mode: ClassVar[str] = "min"
    can_sample: ClassVar[bool] = False
    sample_kind: ClassVar[str] = "images"
    sample_options: ClassVar[frozenset[str]] = frozenset({"num"})
    export_kind: ClassVar[str] = "model"
    export_scored: ClassVar[bool] = False

    @classmethod
    def from_job(cls, job: JobSpec, **options: Any) -> Task:
        """Build the task for `job`; `options` are the job file's `task.options`."""
        return cls(**options)

    # --- the step ---------------------------------------------------------------------------

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's outputs for `batch` (what `loss` and `eval_sums` take)."""
        return model(batch["input"])

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The scalar training loss of one micro-batch: a mean over its samples, or over its
        `loss_items` where the task declares them."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def loss_items(self, batch: dict[str, Tensor]) -> int | None:
        """How many items `loss` averages over in `batch` (target tokens, masked positions),
        where that number depends on the data; computed from the batch alone, before forward.

        Declared: the loop weights each micro-batch by its items against the count of the
        whole global batch (every micro-batch, every rank), so the gradient is the global
        batch's item mean whatever the split (Hugging Face's `num_items_in_batch`). None (the
        default): `loss` is a mean per sample, weighted by the micro-batch's sample count.
        """
        return None

    def set_epoch(self, epoch: int | None) -> None:
        """The training epoch whose batches come next, or None while evaluating.

        The loop calls it as each training epoch begins (a resumed run: the epoch it resumes
        in) and around every evaluation, on every rank alike. A task whose training objective
        draws afresh each epoch (the masked LM's dynamic masks) keys its draws on `epoch`, so
        they stay a function of the data and the epoch: the same on any world size, and after
        a resume. Default: nothing."""

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
        empty: not declared (tune then accepts `val/loss` only)."""
        return ()

    # --- what the commands ask --------------------------------------------------------------

    def example_inputs(
        self, input_shape: tuple[int, ...], dtype: torch.dtype, batch_size: int, device: Any
    ) -> ExampleInputs:
        """Inputs of the model's forward for `batch_size` samples of the data's `input_shape`
        and `dtype`: what the pre-flight `shapes` check (on the meta device) and `models
        summary` feed the model, and what they report. Values do not matter (zeros)."""
        shape = (batch_size, *input_shape)
        return ExampleInputs((torch.zeros(shape, dtype=dtype, device=device),))

    def export_module(self, model: nn.Module) -> nn.Module:
        """The module `export` writes (the whole model by default; a GAN writes its generator)."""
        return model

    def export_inputs(
        self,
        model: nn.Module,
        info: DataInfo,
        dtype: torch.dtype,
        batch_size: int,
        generator: torch.Generator,
        variant: int = 0,
    ) -> ExampleInputs:
        """Inputs of `export_module(model)` for `batch_size` rows, drawn with `generator`.

        Export traces with them and checks onnxruntime against PyTorch on more of them
        (`variant` 1, 2, ...: other sizes, where an axis other than the batch is dynamic). By
        default: `example_inputs`' shapes filled with uniform floats, or token ids below the
        vocabulary (at most 256) for integer inputs.
        """
        example = self.example_inputs(tuple(info.input_shape), dtype, batch_size, "cpu")
        high = min(info.vocab_size or info.num_classes, 256)
        args = tuple(random_like(t, generator, high) for t in example.args)
        return ExampleInputs(args, names=example.names, dynamic_axes=example.dynamic_axes)

    def export_graphs(
        self, model: nn.Module, info: DataInfo, dtype: torch.dtype
    ) -> list[ExportGraph]:
        """What `export --format onnx` writes: `export_module` fed with `export_inputs` (one
        file). A task that writes several files (an encoder and a decoder step) overrides this."""
        module = self.export_module(model).eval()

        def sample(batch: int, gen: torch.Generator, variant: int = 0) -> tuple[Tensor, ...]:
            return self.export_inputs(model, info, dtype, batch, gen, variant).args

        first = self.export_inputs(model, info, dtype, 2, torch.Generator().manual_seed(0))
        names = first.input_names()
        axes = first.dynamic_axes or {name: {0: "batch"} for name in [*names, "output"]}
        return [ExportGraph(module, sample, names, axes, self.export_kind, self.export_scored)]

    def sample(self, model: nn.Module, num: int, generator: torch.Generator) -> Tensor:
        """`num` samples from the model (images `(N, C, H, W)` in [0, 1] for image tasks).

        Raises:
            TaskError: The task cannot sample (`can_sample` is False).
        """
        raise self.cannot_sample()

    def cannot_sample(self) -> TaskError:
        """The one-line error of `roundhouse sample` on a task that does not sample."""
        return TaskError(
            f"task {type(self).__name__} cannot sample",
            "sample a run of a generative task (gan, diffusion, vae, language_model, seq2seq)",
        )

    def check_sample(self, request: SampleRequest, job: JobSpec) -> None:
        """Refuse what this task cannot sample, before the run's weights are read.

        Raises:
            TaskError: The task cannot sample, or a flag given is not among `sample_options`.
        """
        if not self.can_sample:
            raise self.cannot_sample()
        extra = [SampleRequest.flag(k) for k in request.given() if k not in self.sample_options]
        if extra:
            name = f"{job.model.name}:{job.model.flavor}"
            raise TaskError(
                f"{', '.join(extra)}: not for task {type(self).__name__} (model {name})",
                f"remove {', '.join(extra)}",
            )

    def sample_output(self, model: nn.Module, request: SampleRequest, job: JobSpec) -> Tensor | str:
        """What `roundhouse sample` writes: images `(N, C, H, W)` in [0, 1] (`sample_kind`
        `images`) or text. The default draws `--num` (64) images from `sample`.

        Raises:
            TaskError: A request value out of range (`--num` below 1).
        """
        num = 64 if request.num is None else request.num
        if num < 1:
            raise TaskError(f"--num {num} must be >= 1", "e.g. --num 64")
        return self.sample(model, num, torch.Generator().manual_seed(request.seed))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a strategy's wrapper (a DeepSpeed engine's `module`)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model
