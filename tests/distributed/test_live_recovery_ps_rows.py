"""`cluster.recovery: live` under ps with row tables: a model whose embedding has sparse
gradients pushes (row ids, rows) and pulls only the rows its next batch looks up. One of 3
ranks is SIGKILLed mid-step: the survivors redo the step with its share, a replacement joins
and pulls the rows it needs from the servers, and the weights (the table included) equal an
uninterrupted run's; the ledger shows every sample once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from roundhouse.runs.ledger import verify_ledger
from roundhouse.runs.rundir import RunDir
from tests.distributed.test_live_recovery import train
from tests.distributed.test_live_recovery_ps import assert_close_weights, ps_job

LEVELS = 17  # a digit's pixels take the values 0..16 (scaled to [0, 1] by the data)


class KillerBag(nn.Module):
    """Digits as bags of (pixel position, intensity) features: an `EmbeddingBag` with sparse
    gradients over 64 x 17 rows, then a linear head. The worker launched as `kill_rank`
    SIGKILLs itself at training forward `at_call` (once per run with a `marker`)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, kill_rank: int,
                 at_call: int, delay_s: float, marker: str | None) -> None:  # fmt: skip
        super().__init__()
        self.pixels = int(torch.tensor(input_shape).prod())
        self.bag = nn.EmbeddingBag(self.pixels * LEVELS, 16, mode="mean", sparse=True)
        self.head = nn.Linear(16, num_classes)
        self.member = dist.get_rank() if dist.is_initialized() else 0
        self.kill_rank, self.at_call, self.delay_s, self.calls = kill_rank, at_call, delay_s, 0
        self.marker = Path(marker) if marker else None

    def first(self) -> bool:
        """Whether this is the run's first kill (a replacement built later must live)."""
        if self.marker is None:
            return True
        if self.marker.exists():
            return False
        self.marker.write_text("killed")
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            time.sleep(self.delay_s)
            if self.calls == self.at_call and self.member == self.kill_rank and self.first():
                os.kill(os.getpid(), signal.SIGKILL)
        levels = (x.flatten(1) * (LEVELS - 1)).round().clamp(0, LEVELS - 1).long()
        ids = torch.arange(self.pixels, device=x.device) * LEVELS + levels
        return self.head(self.bag(ids))


def killer_bag(
    input_shape: tuple[int, ...],
    num_classes: int,
    kill_rank: int = 2,
    at_call: int = 0,
    delay_s: float = 0.02,
    marker: str | None = None,
) -> nn.Module:
    return KillerBag(input_shape, num_classes, kill_rank, at_call, delay_s, marker)


def rows_job(storage: Path, at_call: int, **options: object) -> dict:
    job = ps_job(storage, at_call)
    job["model"]["name"] = f"{__name__}:killer_bag"
    job["model"]["options"].update(options)
    return job


def test_ps_rows_survivors_redo_the_step_and_a_replacement_pulls_its_rows(tmp_path: Path) -> None:
    """3 -> 2 -> 3 workers: the survivors redo the lost step (its rows pushed once), the
    replacement pulls only the rows its batches touch; table and head equal the uninterrupted
    run's, and every sample is trained once per epoch."""
    options = {"delay_s": 0.05, "marker": str(tmp_path / "killed")}
    jobs = [rows_job(tmp_path / n, at_call=c, **options) for n, c in (("whole", 0), ("j", 5))]
    for job in jobs:
        job["trainer"]["max_epochs"] = 2
    reference, _ = train(jobs[0], set())
    run, members = train(jobs[1], {2}, replace=True)
    assert sorted(members) == [0, 1, 3]
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12, 12], report.as_dict()
    assert_close_weights(run, reference)
