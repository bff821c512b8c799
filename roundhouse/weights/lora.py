"""`model.lora`: low-rank adapters through `peft`, on any model's Linear and Conv layers.

`apply_lora` freezes every base weight (`requires_grad=False`), hashes the base, and injects
peft's LoRA layers into the modules that `model.lora.targets` match (globs over module names,
as `model.named_modules()` names them). Strategies train and exchange only parameters with
`requires_grad`, so only the adapters reach the optimizer, the ring buckets, the parameter
servers and DeepSpeed.

Checkpoints (`AdapterCheckpoint`): the strategy's model state keeps the adapters and the
buffers; the frozen base weights are left out and replaced by where they come from (the job's
model, flavor, options, seed and `init_from`) and their sha256. On resume the base is rebuilt
the same way, its sha256 is checked, and the saved adapters are loaded on top.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from roundhouse.config import JobSpec, LoraConfig
from roundhouse.errors import CheckpointError, JobFileError

logger = logging.getLogger(__name__)

# The layer types peft's LoRA wraps (peft also has Embedding; the brief is Linear and Conv).
LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class LoraState:
    """What `apply_lora` did: which modules got adapters and the frozen base's identity."""

    config: LoraConfig
    targets: list[str]
    base_sha256: str
    source: dict[str, Any]
    frozen: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The checkpoint's record of the adapters and of the base they sit on."""
        return {
            "rank": self.config.rank,
            "alpha": self.config.alpha,
            "targets": list(self.targets),
            "base_sha256": self.base_sha256,
            "base_source": dict(self.source),
        }


def match_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the LoRA-capable modules (Linear, Conv) that any glob in `patterns` matches."""
    return [
        name
        for name, module in model.named_modules()
        if name
        and isinstance(module, LORA_LAYERS)
        and any(fnmatch.fnmatchcase(name, p) for p in patterns)
    ]


def check_targets(model: nn.Module, config: LoraConfig, model_name: str) -> list[str]:
    """The matched module names; none matched is a `JobFileError` that shows some valid ones."""
    targets = match_targets(model, config.targets)
    if targets:
        return targets
    capable = [n for n, m in model.named_modules() if n and isinstance(m, LORA_LAYERS)]
    examples = ", ".join(capable[:4]) or "none: the model has no Linear or Conv layer"
    raise JobFileError(
        f"model.lora.targets {config.targets} match no Linear or Conv layer of {model_name}",
        f"use globs over module names, e.g. {examples}",
    )


def base_sha256(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def base_source(job: JobSpec) -> dict[str, Any]:
    """Where the frozen base comes from: enough to rebuild it bit for bit."""
    return {
        "model": job.model.name,
        "flavor": job.model.flavor,
        "options": dict(job.model.options),
        "seed": job.trainer.seed,
        "init_from": getattr(job.model, "init_from", None),
    }


def apply_lora(model: nn.Module, job: JobSpec) -> LoraState | None:
    """Freeze `model` and inject the job's LoRA adapters in place (None without `model.lora`).

    Raises:
        JobFileError: the targets match no Linear/Conv layer, or the strategy cannot train
            adapters.
    """
    config = job.model.lora
    if config is None:
        return None
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = check_targets(model, config, job.model.name)
    sha = base_sha256(model)
    for p in model.parameters():
        p.requires_grad_(False)
    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        # A full-match regex: plain names would also match longer names ending in them.
        target_modules="|".join(re.escape(t) for t in targets),
        bias="none",
    )
    inject_adapter_in_model(peft_config, model)
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    state = LoraState(config, targets, sha, base_source(job), frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "lora: rank %d on %d modules, %s trainable of %s parameters",
        config.rank,
        len(targets),
        f"{trainable:,}",
        f"{trainable + sum(t.numel() for t in frozen.values()):,}",
    )
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layers back, in place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    return model


class AdapterCheckpoint:
    """Keeps a LoRA run's checkpoints small: adapters and buffers, not the frozen base."""

    def __init__(self, state: LoraState) -> None:
        self.state = state

    def pack(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Drop the frozen base weights from the strategy's model state; add the base record."""
        model = checkpoint["strategy"]["model"]
        checkpoint["strategy"]["model"] = {
            k: v for k, v in model.items() if k not in self.state.frozen
        }
        checkpoint["lora"] = self.state.describe()
        return checkpoint

    def unpack(self, checkpoint: dict[str, Any]) -> dict[str, Any]:
        """Check the checkpoint's base is this run's base; put the base weights back."""
        check_same_base(checkpoint.get("lora"), self.state.base_sha256)
        checkpoint["strategy"]["model"] = fill_base(
            checkpoint["strategy"]["model"], self.state.frozen
        )
        return checkpoint


def check_same_base(record: dict[str, Any] | None, sha256: str) -> None:
    """A LoRA checkpoint resumes only onto the base it was trained on."""
    if record is None:
        raise CheckpointError(
            "checkpoint has no LoRA adapters, but this job sets model.lora",
            "resume with the job file that wrote it",
        )
    if record["base_sha256"] != sha256:
        raise CheckpointError(
            f"the rebuilt base model's sha256 {sha256[:12]} differs from the checkpoint's "
            f"{record['base_sha256'][:12]} (base: {record['base_source']})",
            "resume with the same model, options, seed and init_from as the run that wrote it",
        )


def fill_base(
    model_state: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The saved adapters and buffers plus the frozen base, in one state dict."""
    merged = dict(frozen)
    merged.update(model_state)
    return merged
