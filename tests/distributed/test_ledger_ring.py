"""The sample ledger under `ring` on 2 gloo processes: each rank's share, every sample once."""

from __future__ import annotations

import json
from pathlib import Path

from roundhouse.runs.ledger import verify_ledger
from roundhouse.runs.rundir import RunDir
from tests.distributed.test_ring_training import make_job, train


def test_two_ranks_together_train_every_sample_once(tmp_path: Path) -> None:
    job = make_job(
        tmp_path, "ledger", trainer__ledger=True, trainer__max_steps=None, trainer__max_epochs=1
    )
    job["data"]["batch_size"] = 200
    run = train(job, 2)
    report = verify_ledger(RunDir(str(run)))
    assert report.ok, report.as_dict()
    meta = json.loads((run / "ledger" / "meta.json").read_text())
    assert report.epochs[0].trained == meta["num_samples"]
    ranks = [
        [json.loads(line) for line in (run / "ledger" / f"rank_{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    # Both ranks trained every step, each on about half of the global batch.
    assert [len(lines) for lines in ranks] == [meta["steps_per_epoch"]] * 2
    first = [len(ranks[r][0]["i"]) for r in (0, 1)]
    assert sum(first) == 200 and abs(first[0] - first[1]) <= 1
