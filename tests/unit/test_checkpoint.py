"""Atomic checkpoints: complete-or-invisible, verified, pruned, matched to the job."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from roundhouse.errors import CheckpointError
from roundhouse.runs.rundir import RunDir
from roundhouse.weights.checkpoint import Checkpointer, get_rng_state, set_rng_state

IDENTITY = {"model": "mlp", "flavor": "debug"}


def make(tmp_path: Path, keep_last: int = 3, identity: dict = IDENTITY) -> Checkpointer:
    return Checkpointer(RunDir(str(tmp_path / "run")), keep_last=keep_last, identity=identity)


def test_round_trip_through_weights_only_load(tmp_path: Path) -> None:
    ckpt = make(tmp_path)
    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 7, "nested": {"lr": [0.1, 0.2]}}
    ckpt.save(7, state)
    loaded = ckpt.load()
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 7
    assert loaded["nested"] == {"lr": [0.1, 0.2]}
    assert ckpt.latest_step() == 7


def test_a_half_written_checkpoint_is_invisible(tmp_path: Path) -> None:
    """A crash after the state file but before the manifest leaves the previous one in charge."""
    ckpt = make(tmp_path)
    ckpt.save(5, {"x": torch.ones(1)})
    partial = tmp_path / "run" / "checkpoints" / "step_10"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"truncated")
    assert ckpt.complete_steps() == [5]
    assert ckpt.latest_step() == 5
    assert torch.equal(ckpt.load()["x"], torch.ones(1))


def test_corruption_is_detected(tmp_path: Path) -> None:
    ckpt = make(tmp_path)
    ckpt.save(1, {"x": torch.ones(3)})
    state_file = tmp_path / "run" / "checkpoints" / "step_1" / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[-10] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load()


def test_keeps_only_the_last_k(tmp_path: Path) -> None:
    ckpt = make(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"step": step})
    assert ckpt.complete_steps() == [3, 4]
    assert ckpt.load(3)["step"] == 3


def test_no_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        make(tmp_path).load()


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    make(tmp_path).save(1, {"x": torch.ones(1)})
    other = make(tmp_path, identity={"model": "resnet", "flavor": "debug"})
    with pytest.raises(CheckpointError, match=r"model='mlp'.*model='resnet'"):
        other.load()


def test_rng_states_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    ckpt = make(tmp_path)
    ckpt.save(1, {"rng": get_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(ckpt.load()["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_memory_filesystem_works_like_local() -> None:
    ckpt = Checkpointer(RunDir("memory://rh-test/run"), keep_last=1, identity=IDENTITY)
    ckpt.save(3, {"x": torch.zeros(2)})
    assert ckpt.latest_step() == 3 and torch.equal(ckpt.load()["x"], torch.zeros(2))
