"""Atomic checkpoints on any fsspec URL.

Layout inside a run folder::

    checkpoints/step_<N>/state.pt        torch.save of tensors and plain data (weights_only-safe)
    checkpoints/step_<N>/manifest.json   written after every other file: step, sizes, sha256
    checkpoints/latest                   "step_<N>", moved last

A checkpoint exists only once its manifest does, and `latest` moves only after that, so a crash
mid-write leaves the previous checkpoint usable. Loading uses `torch.load(weights_only=True)`:
nothing is ever unpickled beyond tensors and plain containers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import time
from typing import Any

import numpy as np
import torch

from roundhouse.errors import CheckpointError
from roundhouse.runs.rundir import RunDir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"
MANIFEST = "manifest.json"


def step_folder(step: int) -> str:
    """`step_<N>`: the folder name of the checkpoint of step `step`."""
    return f"step_{step}"


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) RNG states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """`random.setstate` wants nested tuples; serialisation may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def serialize(obj: Any) -> bytes:
    """`torch.save` of `obj` into bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def deserialize(data: bytes) -> Any:
    """Load bytes from `serialize` onto the CPU, tensors and plain data only (`weights_only`)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class Checkpointer:
    """Writes and reads the checkpoints of one run folder.

    Args:
        run_dir: the run folder.
        keep_last: how many complete checkpoints to keep (older ones are deleted).
        identity: what the checkpoint must match to be resumed (e.g. model name and flavor).
    """

    def __init__(self, run_dir: RunDir, *, keep_last: int, identity: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.keep_last = keep_last
        self.identity = identity

    # --- writing ----------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None) -> str:
        """Write a complete checkpoint for `step` and point `latest` at it; return its URL."""
        folder = f"{CHECKPOINTS}/{step_folder(step)}"
        data = serialize(state)
        self.run_dir.write_bytes(f"{folder}/{STATE_FILE}", data)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "created": time.time(),
            "identity": self.identity,
            "files": {STATE_FILE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
            **(meta or {}),
        }
        self.run_dir.write_text(f"{folder}/{MANIFEST}", json.dumps(manifest, indent=2))
        self.run_dir.write_text(f"{CHECKPOINTS}/{LATEST}", step_folder(step))
        self._prune()
        logger.info("checkpoint %s written", self.run_dir.url_of(folder))
        return self.run_dir.url_of(folder)

    def _prune(self) -> None:
        steps = self.complete_steps()
        for step in steps[: -self.keep_last]:
            self.run_dir.remove(CHECKPOINTS, step_folder(step))

    # --- reading ----------------------------------------------------------------------------

    def complete_steps(self) -> list[int]:
        """Steps that have a complete checkpoint (a manifest), ascending."""
        steps = []
        for name in self.run_dir.listdir(CHECKPOINTS):
            if name.startswith("step_") and self.run_dir.exists(CHECKPOINTS, name, MANIFEST):
                steps.append(int(name.removeprefix("step_")))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The step `latest` points at, or None when the run has no checkpoint."""
        if not self.run_dir.exists(CHECKPOINTS, LATEST):
            return None
        name = self.run_dir.read_text(CHECKPOINTS, LATEST).strip()
        return int(name.removeprefix("step_"))

    def manifest(self, step: int) -> dict[str, Any]:
        """The manifest of checkpoint `step` (step, created time, identity, files)."""
        return json.loads(self.run_dir.read_text(CHECKPOINTS, step_folder(step), MANIFEST))

    def load(self, step: int | None = None) -> dict[str, Any]:
        """Read and verify checkpoint `step` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(
                f"no checkpoint in {self.run_dir.url_of(CHECKPOINTS)}",
                "train without --resume first, or pass --resume PATH to another run",
            )
        folder = f"{CHECKPOINTS}/{step_folder(step)}"
        manifest = self.manifest(step)
        self._check_identity(manifest, folder)
        data = self.run_dir.read_bytes(folder, STATE_FILE)
        expected = manifest["files"][STATE_FILE]["sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(
                f"checkpoint {self.run_dir.url_of(folder)} is corrupt (sha256 mismatch)",
                "resume from an earlier step_<N> folder with --resume PATH",
            )
        return deserialize(data)

    def _check_identity(self, manifest: dict[str, Any], folder: str) -> None:
        theirs = manifest.get("identity", {})
        for key, ours in self.identity.items():
            if key in theirs and theirs[key] != ours:
                raise CheckpointError(
                    f"checkpoint {self.run_dir.url_of(folder)} was made with {key}={theirs[key]!r}"
                    f", but this job has {key}={ours!r}",
                    "resume with the job file that wrote it, or start a new run without --resume",
                )
