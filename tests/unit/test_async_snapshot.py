"""`AsyncSaver` reuses the last snapshot's buffers: each checkpoint still holds its own step's
values, and the loop's state is never aliased by a snapshot."""

from __future__ import annotations

from pathlib import Path

import torch

from roundhouse.runs.rundir import RunDir
from roundhouse.trainer.async_checkpoint import AsyncSaver, cpu_snapshot
from roundhouse.weights.checkpoint import Checkpointer


def test_each_checkpoint_holds_its_own_step_with_reused_buffers(tmp_path: Path) -> None:
    checkpointer = Checkpointer(RunDir(str(tmp_path)), keep_last=3, identity={})
    saver = AsyncSaver(checkpointer)
    weight = torch.zeros(64, 64)
    state = {"model": {"w": weight, "steps": [torch.tensor(0)]}, "note": "x"}
    buffers = []
    for step in (1, 2, 3):
        weight.fill_(float(step))
        state["model"]["steps"][0].fill_(step)
        saver.save(step, state, {})
        buffers.append(saver.previous["model"]["w"])
        weight.fill_(-1.0)  # the loop changes its state in place right after the save
    saver.close()
    assert buffers[0] is buffers[1] is buffers[2]  # the same memory, written three times
    assert buffers[0] is not weight
    for step in (1, 2, 3):
        loaded = checkpointer.load(step)
        assert torch.equal(loaded["model"]["w"], torch.full((64, 64), float(step)))
        assert int(loaded["model"]["steps"][0]) == step and loaded["note"] == "x"


def test_a_snapshot_of_another_shape_allocates_anew() -> None:
    old = {"w": torch.zeros(3), "b": (torch.zeros(2),)}
    new = cpu_snapshot({"w": torch.ones(4), "b": (torch.ones(2),)}, old)
    assert new["w"].shape == (4,) and new["w"] is not old["w"]
    assert new["b"][0] is old["b"][0] and torch.equal(old["b"][0], torch.ones(2))
