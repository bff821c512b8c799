"""`cluster.recovery: live` through `roundhouse train` on Ray: roundhouse's own actor group.
One worker SIGKILLs itself mid-step; the two survivors re-form, finish the epoch, and the
ledger shows every sample trained exactly once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from roundhouse.launch.cli import main
from roundhouse.runs.ledger import verify_ledger
from roundhouse.runs.rundir import RunDir
from tests.distributed.test_live_recovery import make_job
from tests.helpers.ray_cluster import RayCluster, start_cluster
from tests.helpers.runs import only_run, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    ray_cluster = start_cluster(head_cpus=3, extra_nodes=())
    try:
        with ray_cluster.as_default():
            yield ray_cluster
    finally:
        ray_cluster.stop()


def test_roundhouse_train_keeps_the_survivors_training(cluster: RayCluster, tmp_path: Path) -> None:
    job = make_job(tmp_path / "runs", at_call=5)
    job["cluster"]["address"] = cluster.gcs_address
    job["model"]["options"]["kill_rank"] = 2
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 0
    run = only_run(tmp_path / "runs", "live")
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and report.epochs[0].steps == 12, report.as_dict()
    lines = (run / "ledger" / "rank_0.jsonl").read_text().splitlines()
    worlds = {json.loads(line)["w"] for line in lines}
    assert worlds == {3, 2}  # trained at 3 workers, then on at 2
    assert max(r["step"] for r in read_metrics(run)) == 12
