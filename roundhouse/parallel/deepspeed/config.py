"""The ds_config DeepSpeed receives, generated from the job so users never repeat themselves.

`build_ds_config` turns the job (batch arithmetic, accumulation, clipping, precision, the typed
`strategy` fields) into a ds_config dict and merges `strategy.config` (raw ds_config keys) last.
A raw key that contradicts a value roundhouse generated from a typed field is an error naming
both, found by `check_raw_config` before anything starts (the launcher's checks call it).

Two generated values differ from DeepSpeed's own defaults on purpose:

- `gradient_clipping` is always written (DeepSpeed defaults to 1.0, which would silently clip
  a job that asked for no clipping);
- the optimizer and scheduler are roundhouse's (`trainer.optimizer`, `trainer.scheduler`),
  handed to `deepspeed.initialize` as client factories, so a DeepSpeed run takes the same steps
  as every other strategy. A raw `optimizer` or `scheduler` section is therefore an error.

This module never imports deepspeed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from roundhouse import models
from roundhouse.config import JobSpec
from roundhouse.config.topology import Topology
from roundhouse.errors import JobFileError
from roundhouse.models.sparse import wants_sparse_gradients
from roundhouse.parallel.deepspeed.section import DeepSpeedStrategyConfig
from roundhouse.parallel.deepspeed.tensor_parallel import SUPPORTED_MODELS, autotp_section
from roundhouse.parallel.sync_norm import SYNC_BATCH

# Raw sections that roundhouse owns through the job file: (raw key, the job field to set instead).
OWNED_SECTIONS = {
    "optimizer": "trainer.optimizer",
    "scheduler": "trainer.scheduler",
}

PIPELINE_PARTITIONS = ("parameters", "uniform", "type:")


@dataclass(frozen=True)
class EngineOptions:
    """The job values a ds_config takes besides the batch arithmetic (`Topology`)."""

    grad_clip_norm: float | None = None
    bf16: bool = False

    @classmethod
    def of_job(cls, job: JobSpec) -> EngineOptions:
        """The options `job` asks for: `trainer.grad_clip_norm`, `trainer.precision`."""
        return cls(job.trainer.grad_clip_norm, job.trainer.precision == "bf16")


def build_ds_config(
    strategy: DeepSpeedStrategyConfig, topology: Topology, options: EngineOptions
) -> dict[str, Any]:
    """The ds_config for `topology`: generated values, then raw keys merged last.

    Raises:
        JobFileError: a raw `strategy.config` key contradicts a typed field (both named).
    """
    generated = generated_config(strategy, topology, options)
    check_raw_config(strategy.config, generated)
    return deep_merge(generated, strategy.config)


def generated_config(
    strategy: DeepSpeedStrategyConfig, topology: Topology, options: EngineOptions
) -> dict[str, Any]:
    """The ds_config roundhouse derives from the job's typed fields (no raw keys)."""
    data_parallel = topology.data_parallel
    accum = topology.grad_accum_steps
    micro = topology.micro_batch
    config: dict[str, Any] = {
        "train_batch_size": micro * accum * data_parallel,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(options.grad_clip_norm or 0.0),
        "zero_optimization": zero_section(strategy),
        "bf16": {"enabled": options.bf16},
        "fp16": {"enabled": False},
        # roundhouse's torch optimizer runs under ZeRO (parity with every other strategy).
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if strategy.pipeline_stages > 1:
        config["pipeline"] = {"stages": strategy.pipeline_stages}
    if strategy.tensor_parallel > 1:
        config["tensor_parallel"] = autotp_section(strategy.tensor_parallel)
        # DeepSpeed derives it from micro x accum x ranks, counting ranks once with and once
        # without the tp ranks (engine vs ZeRO-3 init): a fixed value fails one of the checks.
        del config["train_batch_size"]
    return config


def zero_section(strategy: DeepSpeedStrategyConfig) -> dict[str, Any]:
    """`zero_optimization` from zero_stage and the offload fields."""
    section: dict[str, Any] = {"stage": strategy.zero_stage}
    if strategy.offload_optimizer != "none":
        section["offload_optimizer"] = {"device": strategy.offload_optimizer}
    if strategy.offload_params != "none":
        section["offload_param"] = {"device": strategy.offload_params}
    if strategy.expert_parallel > 1 and strategy.zero_stage == 2:
        # DeepSpeed's MoE support under ZeRO-2 asserts contiguous gradients.
        section["contiguous_gradients"] = True
    return section


# The typed field each generated key comes from, for error messages.
FIELD_OF = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size / (data_parallel x grad_accum_steps)",
    "gradient_accumulation_steps": "trainer.grad_accum_steps",
    "gradient_clipping": "trainer.grad_clip_norm",
    "zero_optimization.stage": "strategy.zero_stage",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.offload_params",
    "bf16.enabled": "trainer.precision",
    "fp16.enabled": "trainer.precision",
    "pipeline.stages": "strategy.pipeline_stages",
    "tensor_parallel.autotp_size": "strategy.tensor_parallel",
}


def check_raw_config(raw: dict[str, Any], generated: dict[str, Any]) -> None:
    """Raise `JobFileError` if a raw ds_config key contradicts a generated (typed) value."""
    for key, field in OWNED_SECTIONS.items():
        if key in raw:
            raise JobFileError(
                f"strategy.config.{key} is set, but roundhouse builds the {key} from {field}",
                f"remove strategy.config.{key} and set {field} instead",
            )
    for path, field in FIELD_OF.items():
        ours, theirs = lookup(generated, path), lookup(raw, path)
        if theirs is _MISSING:
            continue
        if ours is _MISSING:
            ours = DEFAULTS.get(path, _MISSING)
        if ours is not _MISSING and not same_value(ours, theirs):
            raise JobFileError(
                f"strategy.config.{path}={theirs!r} contradicts {field} "
                f"(which gives {path}={ours!r})",
                f"remove strategy.config.{path} or change {field}",
            )


# What a typed field means when roundhouse writes nothing for it (e.g. offload "none").
DEFAULTS = {
    "zero_optimization.offload_optimizer.device": "none",
    "zero_optimization.offload_param.device": "none",
    "pipeline.stages": 1,
    "tensor_parallel.autotp_size": 1,
}

_MISSING = object()


def lookup(config: dict[str, Any], path: str) -> Any:
    """`config["a"]["b"]` for path "a.b", or `_MISSING`."""
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def same_value(ours: Any, theirs: Any) -> bool:
    """Equal, counting 1 and 1.0 (and "none" and None) as the same."""
    if isinstance(ours, str) or isinstance(theirs, str) or theirs is None:
        return str(ours).lower() == str(theirs).lower()
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return ours == theirs
    return float(ours) == float(theirs)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra`'s keys merged in, recursively; `extra` wins; inputs untouched."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def pipeline_partition(raw: dict[str, Any]) -> str:
    """`partition_method` for `PipelineModule` from `strategy.config.pipeline.partition`.

    Default "parameters" (balance trainable parameters). "uniform" balances layer counts;
    "type:<regex>" balances layers whose class name matches.
    """
    method = lookup(raw, "pipeline.partition")
    if method is _MISSING:
        return "parameters"
    if not isinstance(method, str) or not method.startswith(PIPELINE_PARTITIONS):
        raise JobFileError(
            f"strategy.config.pipeline.partition={method!r} is not a partition method",
            "use parameters, uniform or type:<regex>",
        )
    return method


def check_layout(s: DeepSpeedStrategyConfig, topology: Topology) -> None:
    """Layout rules for DeepSpeed on `topology`, with the arithmetic in the message."""
    mp, world_size, dp = topology.model_parallel, topology.world_size, topology.data_parallel
    if world_size % mp:
        raise JobFileError(
            f"pipeline_stages x tensor_parallel = {s.pipeline_stages} x {s.tensor_parallel} = "
            f"{mp} does not divide the world size {world_size}",
            "make cluster.num_workers a multiple of pipeline_stages * tensor_parallel",
        )
    if dp % s.expert_parallel:
        raise JobFileError(
            f"expert_parallel={s.expert_parallel} does not divide the data-parallel size "
            f"{dp} (= world {world_size} / (pipeline_stages {s.pipeline_stages} x "
            f"tensor_parallel {s.tensor_parallel}))",
            "choose expert_parallel dividing the data-parallel size",
        )
    check_combination(s)


def check_combination(s: DeepSpeedStrategyConfig) -> None:
    """Combinations roundhouse does not run (each one said plainly)."""
    if s.offload_params != "none" and s.zero_stage != 3:
        raise JobFileError(
            f"strategy.offload_params={s.offload_params} needs zero_stage=3, got {s.zero_stage}",
            "set strategy.zero_stage=3 or offload_params=none",
        )
    parallel = [
        name
        for name, size in (
            ("pipeline_stages", s.pipeline_stages),
            ("tensor_parallel", s.tensor_parallel),
            ("expert_parallel", s.expert_parallel),
        )
        if size > 1
    ]
    if len(parallel) > 1:
        raise JobFileError(
            f"strategy sets {' and '.join(parallel)} > 1 together; roundhouse runs one of "
            "pipeline, tensor or expert parallel at a time (each with ZeRO data parallel)",
            "keep only one of them above 1",
        )
    if s.expert_parallel > 1 and s.zero_stage == 3:
        raise JobFileError(
            f"expert_parallel={s.expert_parallel} with zero_stage=3: DeepSpeed's MoE layer does "
            "not run under ZeRO-3",
            "set strategy.zero_stage to 0, 1 or 2",
        )
    if s.pipeline_stages > 1 and s.zero_stage > 1:
        raise JobFileError(
            f"pipeline_stages={s.pipeline_stages} with zero_stage={s.zero_stage}: DeepSpeed's "
            "pipeline engine supports ZeRO stages 0 and 1 only",
            "set strategy.zero_stage to 0 or 1",
        )


def check_job(job: JobSpec, world_size: int) -> None:
    """Everything about a DeepSpeed job that can fail before a worker starts.

    Topology arithmetic, raw-vs-typed ds_config conflicts, and what the model must offer:
    `pipeline_layers` for pipeline parallel, a divisible expert count for expert parallel.
    """
    strategy = job.strategy
    assert isinstance(strategy, DeepSpeedStrategyConfig)
    topology = Topology.of_job(job, world_size)
    check_layout(strategy, topology)
    build_ds_config(strategy, topology, EngineOptions.of_job(job))
    pipeline_partition(strategy.config)
    if strategy.expert_parallel > 1:
        check_experts(job, strategy.expert_parallel)
    if strategy.pipeline_stages > 1:
        check_pipeline_model(job)
    if strategy.tensor_parallel > 1:
        check_tensor_parallel_model(job, strategy.tensor_parallel)
    if job.model.lora is not None:
        check_lora_layout(strategy)
    if job.trainer.optimizer.param_groups:
        check_param_groups_layout(strategy)
    if job.model.options.get("norm") == SYNC_BATCH:
        check_sync_batch_layout(strategy)
    check_dense_gradients(job)


def check_dense_gradients(job: JobSpec) -> None:
    """DeepSpeed's engines flatten gradients into dense buffers: no sparse-gradient tables."""
    if wants_sparse_gradients(job.model.name, job.model.flavor, job.model.options):
        raise JobFileError(
            f"model {job.model.name!r} makes sparse gradients (sparse=True embeddings), which "
            "strategy.kind=deepspeed cannot carry",
            "set model.options.sparse=false, or use strategy.kind=ps or ring",
        )


def check_param_groups_layout(strategy: DeepSpeedStrategyConfig) -> None:
    """Parameter groups need every rank to hold the whole model's parameter list."""
    if strategy.pipeline_stages > 1 or strategy.expert_parallel > 1:
        raise JobFileError(
            "trainer.optimizer.param_groups do not work with pipeline or expert parallel "
            "DeepSpeed jobs yet",
            "drop param_groups, or use pipeline_stages=1 and expert_parallel=1",
        )


def check_sync_batch_layout(strategy: DeepSpeedStrategyConfig) -> None:
    """`sync_batch` all-reduces BatchNorm statistics over every rank: with pipeline stages the
    ranks of other stages never reach that layer (a hang), and tensor-parallel ranks hold the
    same samples (counted twice)."""
    if strategy.pipeline_stages > 1 or strategy.tensor_parallel > 1:
        raise JobFileError(
            "model.options.norm=sync_batch needs data parallelism only: pipeline and tensor "
            "parallel ranks do not hold distinct shares of the batch",
            "use pipeline_stages=1 and tensor_parallel=1, or norm batch/group",
        )


def check_lora_layout(strategy: DeepSpeedStrategyConfig) -> None:
    """LoRA adapters train under ZeRO 0-2 with data parallelism only: ZeRO-3 partitions and the
    model-parallel rewrites replace the modules peft wraps."""
    model_parallel = strategy.pipeline_stages * strategy.tensor_parallel
    if strategy.zero_stage == 3 or model_parallel > 1 or strategy.expert_parallel > 1:
        raise JobFileError(
            "model.lora works with DeepSpeed ZeRO stages 0-2 without pipeline, tensor or "
            "expert parallelism",
            "set strategy.zero_stage to 0, 1 or 2 and the parallel sizes to 1",
        )


def check_tensor_parallel_model(job: JobSpec, tp: int) -> None:
    """Tensor parallel splits attention heads and MLPs of gpt, bert and moe, so the model must
    be one of them with a head count the tp size divides."""

    if job.model.name not in SUPPORTED_MODELS:
        raise JobFileError(
            f"strategy.tensor_parallel={tp}: model {job.model.name!r} has no attention/MLP "
            "layers the tensor-parallel rewrite splits",
            f"use model.name in {', '.join(SUPPORTED_MODELS)} or strategy.tensor_parallel=1",
        )
    heads = model_kwargs(job).get("num_heads", 4)
    if heads % tp:
        raise JobFileError(
            f"num_heads={heads} is not divisible by tensor_parallel={tp} "
            f"({heads} % {tp} = {heads % tp})",
            "choose tensor_parallel dividing the model's num_heads",
        )


def model_kwargs(job: JobSpec) -> dict[str, Any]:
    """The model's flavor arguments with the job's options applied."""

    spec = models.get(job.model.name)
    return {**spec.flavors.get(job.model.flavor, {}), **job.model.options}


def check_experts(job: JobSpec, expert_parallel: int) -> None:
    """Expert parallel needs an MoE model whose expert count the ep size divides, and
    micro-batches of one size on every rank (no partial last batch)."""
    num_experts = model_kwargs(job).get("num_experts")
    if num_experts is None:
        raise JobFileError(
            f"strategy.expert_parallel={expert_parallel} needs an MoE model, "
            f"but model {job.model.name!r} has no experts",
            "use model.name=moe or set strategy.expert_parallel=1",
        )
    if num_experts % expert_parallel:
        raise JobFileError(
            f"num_experts={num_experts} is not divisible by expert_parallel={expert_parallel} "
            f"({num_experts} % {expert_parallel} = {num_experts % expert_parallel})",
            "choose expert_parallel dividing model num_experts",
        )
    if job.data.remainder_policy == "partial":
        raise JobFileError(
            f"expert_parallel={expert_parallel} exchanges equal-sized token buffers between "
            "ranks, but data.drop_last=false keeps a smaller last batch whose micro-batches "
            "differ in size from rank to rank",
            "set data.drop_last=true (streamed data: data.remainder=drop or pad)",
        )


def check_pipeline_model(job: JobSpec) -> None:
    """Pipeline parallel needs `pipeline_layers` and no weights tied across stages."""

    if models.get(job.model.name).pipeline_layers is None:
        raise JobFileError(
            f"strategy.pipeline_stages={job.strategy.pipeline_stages}: model "  # type: ignore[union-attr]
            f"{job.model.name!r} has no pipeline_layers",
            "use a model with a flat layer list (gpt, moe, resnet, vgg, ...) or pipeline_stages=1",
        )
    if "num_experts" in model_kwargs(job):
        raise JobFileError(
            f"model {job.model.name!r} has experts: its auxiliary losses arise on earlier "
            "pipeline stages and its output layer is tied to the embedding",
            "use strategy.expert_parallel for MoE models, or pipeline_stages=1",
        )
    import inspect

    param = inspect.signature(models.get(job.model.name).builder).parameters.get("tie_weights")
    default = param.default if param is not None else False
    if model_kwargs(job).get("tie_weights", default):
        raise JobFileError(
            "pipeline parallel splits the embedding and the output layer onto different stages, "
            "so their tied weight cannot stay shared",
            "set model.options.tie_weights=false",
        )
