"""`cluster.recovery: live` through `roundhouse train` on Ray: roundhouse's own actor group.
One worker SIGKILLs itself mid-step; the two survivors re-form and go on, a replacement actor
joins at a step boundary, and the ledger shows every sample trained exactly once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from roundhouse.cluster.live_group import LiveWorkers
from roundhouse.launch.cli import main
from roundhouse.runs.ledger import verify_ledger
from roundhouse.runs.rundir import RunDir
from tests.distributed.test_live_recovery import make_job
from tests.helpers.ray_cluster import RayCluster, start_cluster
from tests.helpers.runs import only_run, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    ray_cluster = start_cluster(head_cpus=4, extra_nodes=())  # ps: 3 workers + 1 server
    try:
        with ray_cluster.as_default():
            yield ray_cluster
    finally:
        ray_cluster.stop()


def test_roundhouse_train_keeps_the_survivors_training(cluster: RayCluster, tmp_path: Path) -> None:
    job = make_job(tmp_path / "runs", at_call=5)
    job["cluster"]["address"] = cluster.gcs_address
    job["model"]["options"].update(kill_rank=2, delay_s=0.1, marker=str(tmp_path / "killed"))
    job["trainer"]["max_epochs"] = 8  # long enough for a new actor to start and join
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 0
    run = only_run(tmp_path / "runs", "live")
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12] * 8, report.as_dict()
    lines = (run / "ledger" / "rank_0.jsonl").read_text().splitlines()
    worlds = [json.loads(line)["w"] for line in lines]
    # Trained at 3 workers, then at 2, then at 3 again once the replacement actor joined.
    assert worlds[0] == 3 and 2 in worlds and worlds[-1] == 3, worlds
    assert max(r["step"] for r in read_metrics(run)) == 96


def test_ps_survivors_go_on_with_the_servers_on_ray(cluster: RayCluster, tmp_path: Path) -> None:
    """ps (sync) on the live actor group: the shard servers are Ray actors that outlive the
    lost worker; the survivors redo its step and a replacement actor joins from the servers."""
    job = make_job(tmp_path / "runs", at_call=5)
    job["strategy"] = {"kind": "ps", "mode": "sync", "num_servers": 1}
    job["strategy"]["server_resources"] = {"CPU": 1}
    job["cluster"].update(address=cluster.gcs_address)
    job["model"]["options"].update(kill_rank=2, delay_s=0.1, marker=str(tmp_path / "killed"))
    job["trainer"]["max_epochs"] = 6
    path = tmp_path / "live_ps.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 0
    run = only_run(tmp_path / "runs", "live")
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12] * 6, report.as_dict()
    lines = (run / "ledger" / "rank_0.jsonl").read_text().splitlines()
    worlds = [json.loads(line)["w"] for line in lines]
    assert worlds[0] == 3 and 2 in worlds, worlds


def test_losing_rank_0_on_ray_hands_the_run_folder_to_a_survivor(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """The driver holds the store, so the actor launched as rank 0 may die too: a survivor
    becomes rank 0 and the run ends with its final metrics (the driver reads them back)."""
    job = make_job(tmp_path / "runs", at_call=5)
    job["cluster"]["address"] = cluster.gcs_address
    job["model"]["options"].update(kill_rank=0, delay_s=0.1, marker=str(tmp_path / "killed"))
    job["trainer"]["max_epochs"] = 3
    path = tmp_path / "live0.yaml"
    path.write_text(yaml.safe_dump(job))
    started = time.monotonic()
    assert main(["train", str(path)]) == 0
    # The replacement actor starts too late to be admitted into so short a run: the driver
    # stops it once the survivors finish, without waiting out the grace for stragglers.
    assert time.monotonic() - started < LiveWorkers.FINISH_GRACE_S
    run = only_run(tmp_path / "runs", "live")
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12] * 3, report.as_dict()
    assert (tmp_path / "killed").exists()
    lines = [json.loads(line) for line in (run / "ledger" / "rank_0.jsonl").read_text().split()]
    assert {line["w"] for line in lines} >= {2, 3}, lines  # trained at 3, and at 2 after the kill
    rows = read_metrics(run)
    assert rows[-1]["step"] == 36 and "test/accuracy" in rows[-1], rows[-1]
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_losing_every_worker_that_holds_the_state_restarts_from_the_checkpoint(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """2 workers: worker 1 dies, worker 0 trains alone and dies too, while the fresh
    replacements wait to join. Nobody holds the state, so the driver restarts the group from
    the newest checkpoint (as `recovery: restart` would) instead of failing or hanging."""
    job = make_job(tmp_path / "runs", at_call=5)
    job["cluster"].update(address=cluster.gcs_address, num_workers=2, max_failures=4)
    job["model"]["options"].update(kill_rank=1, delay_s=0.1, marker=str(tmp_path / "killed"),
                                   alone_rank=0, alone_call=2)  # fmt: skip
    job["trainer"]["max_epochs"] = 3
    job["trainer"]["checkpoint"] = {"every_epoch": False, "every_steps": 4}
    path = tmp_path / "live_lost.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 0
    run = only_run(tmp_path / "runs", "live")
    report = verify_ledger(RunDir(str(run)))
    assert report.ok and [e.steps for e in report.epochs] == [12] * 3, report.as_dict()
    lines = (run / "ledger" / "resumes.jsonl").read_text().splitlines()
    resumes = [json.loads(line)["step"] for line in lines]
    assert 4 in resumes, resumes  # the restart went on from the checkpoint of step 4
    assert read_metrics(run)[-1]["step"] == 36
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
