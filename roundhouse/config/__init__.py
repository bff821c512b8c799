"""The job file schema: `JobSpec` and its sections.

A job file is YAML validated into these pydantic models. Every model forbids unknown keys, so a
typo is an error that names the key. `JobSpec` is plain data: it imports nothing from the rest
of roundhouse, so every part (launch, cluster, trainer) can depend on it.

Batch arithmetic: `data.batch_size` is the *global* batch per optimizer step. Each step, every
data-parallel rank runs `trainer.grad_accum_steps` micro-batches of
`batch_size / (data_parallel * grad_accum_steps)` samples. The same job therefore trains the same
way on one process or on many, which is what makes distributed runs comparable (and resumable at
another world size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from .adapt import DistillConfig, LoraConfig
from .base import NonNegInt, Section
from .data import (
    AugmentConfig,
    DataConfig,
    StreamCacheConfig,
    StreamSplitConfig,
)
from .strategies import (
    AutoStrategyConfig,
    DeepSpeedStrategyConfig,
    PSStrategyConfig,
    RingStrategyConfig,
    SingleStrategyConfig,
    SlowWorkerConfig,
)
from .strategy_section import (
    StrategyConfig,
    StrategySection,
    on_section_registered,
    strategy_sections,
)
from .task import TaskConfig, TaskOptimizerConfig
from .validation import validate_model

__all__ = [
    "AugmentConfig",
    "AutoStrategyConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "DataConfig",
    "DeepSpeedStrategyConfig",
    "DistillConfig",
    "EarlyStoppingConfig",
    "JobSpec",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "NonNegInt",
    "OptimizerConfig",
    "PSStrategyConfig",
    "ParamGroupConfig",
    "RingStrategyConfig",
    "SchedulerConfig",
    "Section",
    "SingleStrategyConfig",
    "SlowWorkerConfig",
    "StorageConfig",
    "StrategyConfig",
    "StrategySection",
    "StreamCacheConfig",
    "StreamSplitConfig",
    "TaskConfig",
    "TaskOptimizerConfig",
    "TrackingConfig",
    "TrainerConfig",
    "WandbConfig",
    "strategy_sections",
]


# --- model -------------------------------------------------------------------------------------


class ModelConfig(Section):
    """Which registered model to build. `roundhouse models list` shows the names and flavors."""

    name: str = Field(
        description="Registered model name, `torchvision:<name>` or `module:callable`."
    )
    flavor: str = Field("debug", description="Size preset; every model has `debug`.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Model-specific keyword arguments (e.g. dropout)."
    )
    lora: LoraConfig | None = Field(None, description="Train low-rank adapters only (peft).")
    init_from: str | None = Field(
        None,
        description="Start from these weights (step 0, fresh optimizer): a roundhouse run or "
        "checkpoints/step_N folder, a .safetensors or torch state-dict file, a Hugging Face "
        "GPT-2/BERT folder, or a torchvision state dict; any fsspec URL.",
    )
    init_skip: list[str] = Field(
        default_factory=list,
        description="Globs of tensor names left freshly initialised (e.g. ['fc.*'] for a new "
        "head).",
    )


# --- trainer -----------------------------------------------------------------------------------


class ParamGroupConfig(Section):
    """Optimizer settings for the trainable parameters whose names match `match`."""

    match: str = Field(description="Glob over parameter names, e.g. 'layer*' or '*.bias'.")
    lr_scale: PositiveFloat = Field(1.0, description="This group's lr = lr x lr_scale.")
    weight_decay: Annotated[float, Field(ge=0)] | None = Field(
        None, description="This group's weight decay (default: the optimizer's)."
    )


class OptimizerConfig(Section):
    """Optimizer; defaults follow the notes (Adam lr 1e-3, betas 0.9/0.999, momentum 0.9)."""

    name: str = Field("adam", description="sgd | rmsprop | adagrad | adam | adamw | lazy_adam")
    lr: PositiveFloat = Field(1e-3, description="Learning rate (the schedule scales it).")
    weight_decay: Annotated[float, Field(ge=0)] = Field(
        0.0, description="Weight decay as torch applies it (decoupled for adamw)."
    )
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.9, description="SGD only (RMSprop runs without momentum, as in the notes)."
    )
    nesterov: bool = Field(False, description="SGD only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam and AdamW.")
    alpha: Annotated[float, Field(gt=0, lt=1)] = Field(0.99, description="RMSprop decay.")
    eps: PositiveFloat = Field(1e-8, description="Denominator term: rmsprop, adagrad, adam(w).")
    param_groups: list[ParamGroupConfig] = Field(
        default_factory=list,
        description="Per-parameter settings by name glob, first match wins; the rest keep "
        "lr and weight_decay. The schedule scales every group.",
    )


class SchedulerConfig(Section):
    """Learning-rate schedule, applied per optimizer step (epoch-based ones are converted)."""

    name: str = Field("constant", description="constant | step | exponential | cosine")
    warmup_steps: NonNegInt = Field(0, description="Linear warmup from 0 before the schedule.")
    step_epochs: PositiveFloat = Field(10, description="step: decay every this many epochs.")
    gamma: Annotated[float, Field(gt=0, le=1)] = Field(
        0.5, description="step: factor per decay; exponential: factor per epoch."
    )
    min_lr: Annotated[float, Field(ge=0)] = Field(0.0, description="cosine: final lr.")


class LossConfig(Section):
    """Training loss for classifiers and regressors (models with their own loss ignore it)."""

    name: str = Field(
        "cross_entropy",
        description="cross_entropy | focal | mse | l1 | huber (mse, l1, huber also regression)",
    )
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="cross_entropy and language models: label smoothing."
    )
    focal_gamma: Annotated[float, Field(ge=0)] = Field(2.0, description="focal: gamma.")
    focal_alpha: Annotated[float, Field(ge=0, le=1)] | None = Field(
        0.25, description="focal: class weight alpha (null: none)."
    )
    huber_delta: Annotated[float, Field(gt=0)] = Field(
        1.0, description="Huber loss: quadratic below this error, linear above"
    )


class EarlyStoppingConfig(Section):
    """Stop when `metric` has not improved for `patience` evaluations."""

    metric: str | None = Field(
        None, description="The metric watched, e.g. val/accuracy (default: the task's own)."
    )
    mode: Literal["min", "max"] | None = Field(
        None,
        description="min: lower is better; max: higher (default: the task's direction for "
        "its own metric, else min).",
    )
    patience: PositiveInt = Field(5, description="Evaluations without improvement, then stop.")
    min_delta: Annotated[float, Field(ge=0)] = Field(
        0.0, description="The smallest change that counts as an improvement."
    )


class CheckpointConfig(Section):
    """When checkpoints are written (always at the end of training)."""

    # `async` is a Python keyword: the field is `async_`, read and written as `async`.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, serialize_by_alias=True
    )

    every_steps: PositiveInt | None = Field(None, description="Every N optimizer steps.")
    every_epoch: bool = Field(True, description="At the end of each epoch.")
    keep_last: PositiveInt = Field(3, description="How many step_<N> folders to keep.")
    async_: bool = Field(
        False,
        alias="async",
        description="Snapshot the state to CPU memory and write it in a background thread; "
        "the loop waits only for the snapshot (and for the previous save to finish).",
    )


class TrainerConfig(Section):
    """The training loop."""

    max_epochs: PositiveInt | None = Field(
        10, description="Stop after this many epochs (or max_steps, whichever comes first)."
    )
    max_steps: NonNegInt | None = Field(
        None, description="Stops first if set; 0 only converts (init_from -> a step-0 checkpoint)."
    )
    seed: int = Field(0, description="Seeds the weights, data order, augmentation and most splits.")
    device: str = Field("auto", description="auto (CUDA when available) | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    deterministic: bool = Field(True, description="Deterministic kernels (bit-exact on CPU).")
    compile: bool = Field(
        False, description="torch.compile the model (DeepSpeed: the engine's own compile)."
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode, with compile: true."
    )
    grad_accum_steps: PositiveInt = Field(
        1, description="Micro-batches per optimizer step on each data-parallel rank."
    )
    grad_clip_norm: PositiveFloat | None = Field(
        None, description="Clip the global gradient norm to this (not with strategy ps)."
    )
    skip_nonfinite_steps: bool = Field(
        False, description="Skip a step whose loss is NaN/inf instead of stopping."
    )
    eval_every_steps: PositiveInt | None = Field(
        None, description="Validate every N steps (and always at each epoch end)."
    )
    log_every_steps: PositiveInt = Field(
        10, description="Log train metrics (W&B, metrics.jsonl, console) every N steps."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    early_stopping: EarlyStoppingConfig | None = None
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ledger: bool = Field(
        False,
        description="Every rank appends the sample indices it trained per step to the run "
        "folder's ledger/; `roundhouse runs verify RUN` checks each epoch trained every sample "
        "exactly once.",
    )
    distill: DistillConfig | None = Field(None, description="Distil from a teacher run.")
    freeze: list[str] = Field(
        default_factory=list,
        description="Globs of parameter names to freeze: no gradient, not in the optimizer, "
        "not exchanged. Each must match something.",
    )

    @model_validator(mode="after")
    def _needs_a_limit(self) -> TrainerConfig:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("set trainer.max_epochs or trainer.max_steps")
        return self


# --- cluster, tracking, storage -----------------------------------------------------------------


class ClusterConfig(Section):
    """Where workers run when not `--local`: an embedded Ray cluster or `address`."""

    address: str | None = Field(None, description="Ray address; none starts an embedded cluster.")
    num_workers: PositiveInt = 2
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0
    placement: Literal["pack", "spread", "strict_spread"] = "pack"
    max_failures: NonNegInt = Field(
        0,
        description="restart: times Ray may restart the worker group after a lost worker or "
        "node (and, counted apart, times a group's start may fail); live: lost actors that "
        "may be replaced (at least num_workers).",
    )
    min_workers: PositiveInt | None = Field(None, description="Elastic lower bound.")
    collective_timeout_s: PositiveFloat = 600.0
    recovery: Literal["restart", "live"] = Field(
        "restart",
        description="restart: a lost worker restarts the group from the latest checkpoint; "
        "live: the survivors re-form and redo the step at once (ring only).",
    )
    preempt_grace_s: PositiveFloat = Field(
        30.0,
        description="On SIGTERM, write a checkpoint at the next step boundary within this "
        "many seconds, then exit.",
    )
    keep_warm_s: Annotated[float, Field(ge=0)] = Field(
        120.0,
        description="recovery: live: keep the worker actors this many seconds after a run "
        "for the next run on the cluster (or sweep trial) to reuse; 0: end them with the run.",
    )
    schedule_timeout_s: PositiveFloat = 120.0
    runtime_env: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _min_le_max(self) -> ClusterConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"cluster.min_workers ({self.min_workers}) exceeds "
                f"cluster.num_workers ({self.num_workers})"
            )
        return self


class WandbConfig(Section):
    """Weights & Biases. `auto`: online when WANDB_API_KEY is set, else offline."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = Field("roundhouse", description="W&B project.")
    entity: str | None = Field(None, description="W&B user or team (default: the key's).")
    group: str | None = Field(None, description="W&B group (a sweep sets tune-<id>).")
    tags: list[str] = Field(default_factory=list, description="W&B tags.")


class TrackingConfig(Section):
    """Metrics: W&B, `metrics.jsonl` (always) and the console."""

    wandb: WandbConfig = Field(default_factory=WandbConfig)
    console: Literal["auto", "rich", "plain", "off"] = Field(
        "auto", description="auto: a progress bar on a terminal, plain lines otherwise."
    )

    @field_validator("console", mode="before")
    @classmethod
    def _yaml_off_is_false(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False; that is what the user meant.
        return "off" if value is False else value


class StorageConfig(Section):
    """Where run folders go: `<path>/<job name>/<run id>/` on any fsspec URL."""

    path: str = Field("./runs", description="Root of the run folders: a path or fsspec URL.")
    run_id: str | None = Field(None, description="Default: a new timestamped id.")


# --- the job -----------------------------------------------------------------------------------


class JobSpec(Section):
    """A whole job file."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")] = Field(
        description="Job name; also the run folder's parent."
    )
    model: ModelConfig
    task: TaskConfig = Field(
        default_factory=TaskConfig, description="The objective: a task name or module:Class."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    strategy: StrategyConfig = Field(default_factory=SingleStrategyConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)

    def with_strategy(
        self, section: Mapping[str, Any] | Section, source: str = "strategy"
    ) -> JobSpec:
        """This job with its `strategy` section replaced, validated like a job file.

        Args:
            section: the new `strategy` section, as a dict (`{"kind": "ring", ...}`) or a
                section object.
            source: what a validation error names as the job's origin.

        Raises:
            JobFileError: the job does not validate with that section.
        """
        data = self.model_dump(mode="json")
        if isinstance(section, Section):
            section = section.model_dump(mode="json")
        data["strategy"] = dict(section)
        return validate_model(JobSpec, data, source)

    @model_validator(mode="after")
    def _compile_needs_no_pipeline(self) -> JobSpec:
        stages = getattr(self.strategy, "pipeline_stages", 1)
        if self.trainer.compile and stages > 1:
            raise ValueError(
                f"trainer.compile=true does not work with strategy.pipeline_stages={stages} "
                "(the pipeline engine runs the layers itself): set trainer.compile=false"
            )
        return self

    @model_validator(mode="after")
    def _strategy_resolves_in_the_job(self) -> JobSpec:
        self.strategy.resolve_in(self)  # the section's own job-wide checks and defaults
        return self


# A strategy section defined after this module (a new strategy's own module) joins the union.
on_section_registered(lambda: JobSpec.model_rebuild(force=True))
