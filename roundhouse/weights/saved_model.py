"""A trained model back from its run: for export, for a distillation teacher, for `ckpt export`.

`load_saved_model(ref)` reads a run folder (its latest checkpoint) or one
`checkpoints/step_<N>` folder on any fsspec URL, rebuilds the model from the run's `job.yaml`
exactly as `run_worker` built it (same seed, so a LoRA run's frozen base is rebuilt bit for bit
and its sha256 checked), and loads the checkpoint's consolidated weights: every strategy's
checkpoint holds them (DeepSpeed gathers its partitions when it saves).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from roundhouse.config import JobSpec
from roundhouse.config.loading import parse_job_text
from roundhouse.data import Splits
from roundhouse.errors import CheckpointError, JobFileError
from roundhouse.runs.rundir import RunDir
from roundhouse.weights.checkpoint import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    Checkpointer,
    get_rng_state,
    set_rng_state,
)
from roundhouse.weights.finetune import apply_finetune
from roundhouse.weights.lora import LoraState, apply_lora, check_same_base, fill_base, merge_lora
from roundhouse.weights.model_build import build_model_with_data, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class SavedModel:
    """A model rebuilt from a job (and, from a run, loaded with a checkpoint's weights)."""

    job: JobSpec
    model: nn.Module
    splits: Splits
    lora: LoraState | None = None
    step: int | None = None


def find_checkpoint(ref: str, step: int | None) -> tuple[RunDir, int]:
    """The run folder and checkpoint step that `ref` (run or step folder) and `step` name."""
    target = RunDir(ref.rstrip("/"))
    if not target.exists(MANIFEST) and not target.exists(CHECKPOINTS, LATEST):
        target = newest_run(target)  # a job folder: its newest run with a checkpoint
    if target.exists(MANIFEST):  # a checkpoints/step_<N> folder
        step = step if step is not None else int(target.url.rsplit("_", 1)[-1])
        target = RunDir(target.url.rsplit("/", 2)[0])
    available = Checkpointer(target, keep_last=1, identity={}).complete_steps()
    if not available or (step is not None and step not in available):
        raise CheckpointError(
            f"no checkpoint{'' if step is None else f' step_{step}'} in {target.url}",
            f"available steps: {', '.join(map(str, available)) or 'none'}",
        )
    return target, step if step is not None else available[-1]


def newest_run(job_dir: RunDir) -> RunDir:
    """The newest run under `<storage>/<job name>` that has a checkpoint (else `job_dir`)."""
    for name in reversed(job_dir.listdir()):
        if job_dir.exists(name, CHECKPOINTS, LATEST):
            return RunDir(job_dir.url_of(name))
    return job_dir


def load_checkpoint_state(ref: str, step: int | None) -> tuple[RunDir, int, dict]:
    """The verified checkpoint state (see `Checkpointer.load`) of run/step folder `ref`."""
    run_dir, step = find_checkpoint(ref, step)
    return run_dir, step, Checkpointer(run_dir, keep_last=1, identity={}).load(step)


def load_model_weights(ref: str, step: int | None) -> dict[str, torch.Tensor]:
    """The consolidated model weights saved in checkpoint `step` (None: latest) of `ref`."""
    return load_checkpoint_state(ref, step)[2]["strategy"]["model"]


def read_run_job(run_dir: RunDir) -> JobSpec:
    """The resolved job a run folder was trained with (its `job.yaml`)."""
    if not run_dir.exists("job.yaml"):
        raise CheckpointError(
            f"{run_dir.url} has no job.yaml", "pass a roundhouse run folder or its step folder"
        )
    try:
        return parse_job_text(run_dir.read_text("job.yaml"), f"{run_dir.url}/job.yaml")
    except JobFileError as exc:
        raise JobFileError(
            f"{exc.what}: the run does not fit this version of roundhouse",
            "export with the roundhouse version that trained the run",
        ) from None


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing the caller's Python, NumPy and torch RNG streams."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def build_job_model(job: JobSpec) -> tuple[nn.Module, LoraState | None, Splits]:
    """The job's model (with its LoRA adapters) built as `run_worker` builds it, on the CPU.

    A LoRA run's checkpoint holds only the adapters, so its base is rebuilt from its source
    (`init_from`, then the seed) exactly as training built it; any other checkpoint holds every
    weight and overwrites whatever the model starts with.
    """
    with preserved_rng():
        seed_everything(job.trainer.seed, False, torch.device("cpu"))
        model, splits = build_model_with_data(job)
        if job.model.lora is not None:
            apply_finetune(model, job)
        lora = apply_lora(model, job)
    return model, lora, splits


def load_saved_model(ref: str, step: int | None = None, *, merge: bool = False) -> SavedModel:
    """Rebuild run `ref`'s model and load checkpoint `step` (None: latest) into it.

    Args:
        ref: a run folder, a `checkpoints/step_<N>` folder, or a job folder
            (`<storage>/<job name>`: its newest run with a checkpoint), on any fsspec URL.
        step: the checkpoint step; None for the latest (or the step folder's own).
        merge: fold LoRA adapters into the base weights (the plain model comes back).
    """
    run_dir, step, state = load_checkpoint_state(ref, step)
    job = read_run_job(run_dir)
    model, lora, splits = build_job_model(job)
    weights = state["strategy"]["model"]
    if lora is not None:
        check_same_base(state.get("lora"), lora.base_sha256)
        weights = fill_base(weights, lora.frozen)
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {run_dir.url} step {step} does not fit its job's model: "
            f"{str(exc).splitlines()[1 if len(str(exc).splitlines()) > 1 else 0].strip()}",
            "pass the run folder that wrote the checkpoint",
        ) from None
    if merge and lora is not None:
        merge_lora(model)
    model.eval()
    logger.info("loaded %s step %d (%s)", run_dir.url, step, job.model.name)
    return SavedModel(job, model, splits, None if merge else lora, step)
