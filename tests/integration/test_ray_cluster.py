"""The worker group on a multi-node Ray cluster: topology, restarts, shrinking, timeouts, bad input.

One `ray.cluster_utils.Cluster` for the module, all on 127.0.0.1 with free ports and a private
temp dir: a head without CPUs (it hosts only Ray Train's controller) and two 1-CPU nodes, so
`strict_spread` puts each of the 2 workers on its own node. Every run goes through the CLI
(`roundhouse train JOB --address ...`), as a user's would.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from roundhouse.launch.cli import main
from roundhouse.parallel.net import free_port
from tests.helpers.runs import assert_same_weights, final_weights, only_run, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 120
ACCURACY_TARGET = 0.9


@pytest.fixture(scope="module")
def cluster() -> Iterator:
    from ray._common.utils import get_default_ray_temp_dir
    from ray.cluster_utils import Cluster

    # `Cluster` writes its address into Ray's default temp folder, which a fresh machine lacks
    os.makedirs(get_default_ray_temp_dir(), exist_ok=True)

    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # unix socket paths must stay short
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "gcs_server_port": free_port(),
            "include_dashboard": False,
            "temp_dir": temp_dir,
        },
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        yield cluster
    finally:
        cluster.shutdown()


def write_job(folder: Path, name: str, model: dict, **cluster: object) -> Path:
    job = {
        "name": name,
        "model": model,
        "data": {"source": "builtin:digits", "batch_size": 32},
        "trainer": {
            "max_steps": STEPS,
            "max_epochs": None,
            "log_every_steps": 5,
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_steps": 10},
        },
        "strategy": {"kind": "ring"},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1, **cluster},
        "storage": {"path": str(folder / "runs")},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def crash_once_model(marker: Path) -> dict:
    return {
        "name": "tests.helpers.faults:crash_once_mlp",
        "flavor": "default",
        "options": {"marker": str(marker), "at_call": 15},
    }


def rank_records(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank_*.json"))]


def messages(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted 2-worker run, strict_spread (its marker exists: it never crashes)."""
    folder = tmp_path_factory.mktemp("reference")
    marker = folder / "crashed"
    marker.write_text("no crash in the reference run")
    job = write_job(folder, "ref", crash_once_model(marker), placement="strict_spread")
    handler, logger = _Collect(), logging.getLogger("roundhouse")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code = main(["train", str(job), "--address", cluster.address])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    run = only_run(folder / "runs", "ref")
    return {"code": code, "run": run, "logs": handler.lines}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name}: {record.getMessage()}")


def test_strict_spread_ranks_on_distinct_nodes_with_correct_topology(cluster, reference) -> None:
    """Each rank on its own Ray node: node_rank 0/1, local_rank 0 of 1, 2 nodes; progress shown.

    Ray Train numbers nodes by IP, and every node here is 127.0.0.1: roundhouse must count
    Ray nodes, not addresses.
    """
    assert reference["code"] == 0
    records = rank_records(reference["run"])
    worker_nodes = {node.node_id for node in cluster.worker_nodes}
    assert [r["rank"] for r in records] == [0, 1]
    assert {r["node_id"] for r in records} == worker_nodes  # two distinct, non-head nodes
    assert sorted(r["node_rank"] for r in records) == [0, 1]
    for record in records:
        assert record["world_size"] == 2 and record["num_nodes"] == 2
        assert record["local_rank"] == 0 and record["local_world_size"] == 1
        assert record["node_ip"] == "127.0.0.1" and record["resume_step"] is None
    # The driver showed progress from metrics.jsonl: plain lines up to the last step.
    console = [line for line in reference["logs"] if line.startswith("roundhouse.runs.console")]
    assert any(f"step {STEPS}/{STEPS}" in line for line in console), console
    assert any("test/accuracy" in line for line in console), console
    final = read_metrics(reference["run"])[-1]
    assert final["step"] == STEPS and final["test/accuracy"] >= ACCURACY_TARGET


def test_killed_worker_restarts_and_ends_bit_identical(
    cluster, reference, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 1 SIGKILLs itself in step 15; Ray restarts the group, which resumes from step 10.

    The final weights equal the uninterrupted run's bit for bit (CPU, fixed seeds).
    """
    marker = tmp_path / "crashed"
    job = write_job(tmp_path, "crash", crash_once_model(marker), max_failures=1)
    with caplog.at_level(logging.INFO):
        assert main(["train", str(job), "--address", cluster.address]) == 0
    assert marker.exists()  # the crash did happen
    run = only_run(tmp_path / "runs", "crash")
    restarts = [m for m in messages(caplog, "roundhouse.cluster.progress") if "restarted" in m]
    assert len(restarts) == 1 and "checkpoint step 10" in restarts[0], restarts
    assert rank_records(run)[0]["resume_step"] == 10
    assert read_metrics(run)[-1]["step"] == STEPS
    assert_same_weights(final_weights(run), final_weights(reference["run"]))


def test_stalled_rank_fails_within_the_collective_timeout(
    cluster, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Rank 1 stops responding in step 3: rank 0 gives up after 10 s, naming rank 1 and the op."""
    model = {"name": "tests.helpers.faults:stall_mlp", "flavor": "default"}
    job = write_job(tmp_path, "stall", model, collective_timeout_s=10)
    assert main(["train", str(job), "--address", cluster.address]) == 2
    ended = time.time()
    records = rank_records(only_run(tmp_path / "runs", "stall"))
    assert ended - max(r["started"] for r in records) < 60  # 10 s timeout + Ray's overhead
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert "rank 0 waited 10 s in ring all-reduce" in errors[0] and "for rank 1" in errors[0]


@pytest.mark.parametrize(
    "overrides",
    [["cluster.gpus_per_worker=8"], ["cluster.num_workers=3", "cluster.placement=strict_spread"]],
    ids=["gpus-on-cpu-cluster", "more-nodes-than-exist"],
)
def test_unsatisfiable_request_fails_within_schedule_timeout(
    cluster, tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str]
) -> None:
    job = write_job(tmp_path, "big", {"name": "mlp", "flavor": "debug"}, schedule_timeout_s=5)
    started = time.monotonic()
    assert main(["train", str(job), "--address", cluster.address, *overrides]) == 2
    assert time.monotonic() - started < 45  # connect + 5 s, not forever
    err = capsys.readouterr().err
    assert "error: the cluster cannot run" in err and "waited 5 s" in err


def test_unreachable_address_is_a_fast_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = write_job(tmp_path, "nowhere", {"name": "mlp", "flavor": "debug"})
    started = time.monotonic()
    assert main(["train", str(job), "--address", f"127.0.0.1:{free_port()}"]) == 2
    assert time.monotonic() - started < 15
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot connect to the Ray cluster" in errors[0], errors


def test_elastic_group_shrinks_to_one_worker_and_reaches_the_target(
    cluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Rank 1's node is removed mid-run; with min_workers=1 the run continues on one worker.

    It resumes from the latest checkpoint at world size 1 (same global batches) and reaches the
    accuracy an uninterrupted 2-worker run reaches. Runs last: it takes a node away.
    """
    model = {"name": "tests.helpers.models:slow_mlp", "flavor": "default"}
    model["options"] = {"delay_s": 0.05}
    job = write_job(
        tmp_path, "elastic", model, min_workers=1, max_failures=1, schedule_timeout_s=10
    )
    remover = threading.Thread(target=remove_node_of_rank_1, args=(cluster, tmp_path), daemon=True)
    remover.start()
    with caplog.at_level(logging.INFO):
        assert main(["train", str(job), "--address", cluster.address]) == 0
    remover.join(timeout=5)
    run = only_run(tmp_path / "runs", "elastic")
    records = rank_records(run)
    assert len(records) == 1 and records[0]["world_size"] == 1
    assert records[0]["resume_step"] is not None and records[0]["resume_step"] >= 30
    restarts = [m for m in messages(caplog, "roundhouse.cluster.progress") if "restarted" in m]
    assert restarts and "1 worker(s)" in restarts[-1], restarts
    final = read_metrics(run)[-1]
    assert final["step"] == STEPS and final["test/accuracy"] >= ACCURACY_TARGET


def remove_node_of_rank_1(cluster, folder: Path, timeout_s: float = 600) -> None:
    """Once step 30 is checkpointed, remove the Ray node that hosts rank 1."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = list((folder / "runs" / "elastic").glob("*/checkpoints/step_30/manifest.json"))
        if runs:
            record = json.loads((runs[0].parents[2] / "ranks" / "rank_1.json").read_text())
            node = next(n for n in cluster.worker_nodes if n.node_id == record["node_id"])
            cluster.remove_node(node)
            return
        time.sleep(0.05)


def test_node_layout_counts_ray_nodes_not_addresses() -> None:
    from roundhouse.cluster.workers import node_layout

    ids = ["a", "b", "a", "c"]
    assert node_layout(ids, 2) == {
        "node_rank": 0,
        "num_nodes": 3,
        "local_rank": 1,
        "local_world_size": 2,
    }
    assert node_layout(ids, 3)["node_rank"] == 2


def test_capacity_arithmetic() -> None:
    from roundhouse.cluster.capacity import max_workers

    nodes = [{"CPU": 4.0}, {"CPU": 1.0}, {"CPU": 0.0}]
    assert max_workers(nodes, {"CPU": 1.0}, "pack") == 5
    assert max_workers(nodes, {"CPU": 1.0}, "strict_spread") == 2
    assert max_workers(nodes, {"CPU": 1.0, "GPU": 1.0}, "pack") == 0
    assert max_workers(nodes, {"CPU": 2.0}, "spread") == 2


@pytest.mark.parametrize("min_workers", [None, 1], ids=["fixed", "elastic"])
def test_a_worker_lost_while_the_group_starts_is_one_more_failure_not_the_end(
    min_workers: int | None,
) -> None:
    """Ray Train's own failure policy, given roundhouse's failure config: a kill that lands
    while the restarted group starts (a controller failure to Ray) is retried within
    `max_failures`, as a kill during training is. A fixed group used to allow none, so the
    restart trace ended at its second kill; an elastic group retries without limit."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError
    from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
    from ray.train.v2.api.exceptions import ControllerError

    from roundhouse.cluster.workers import build_failure_config
    from roundhouse.config.loading import validate_job

    def decisions(max_failures: int, failures: int) -> list[FailureDecision]:
        cluster = {"num_workers": 3, "max_failures": max_failures, "min_workers": min_workers}
        job = validate_job({"name": "f", "model": {"name": "mlp"}, "cluster": cluster})
        policy = DefaultFailurePolicy(build_failure_config(job.cluster))
        lost = ControllerError(WorkerGroupStartupFailedError("a worker died during startup"))
        return [policy.make_decision(lost) for _ in range(failures)]

    retry, stop = FailureDecision.RETRY, FailureDecision.RAISE
    if min_workers is None:
        assert decisions(2, 3) == [retry, retry, stop]
        assert decisions(0, 1) == [stop]  # the default still fails at once
    else:
        assert decisions(0, 5) == [retry] * 5


def test_restart_is_counted_from_rank_0_records(tmp_path: Path) -> None:
    """The driver's monitor: a second rank-0 record after the job started is one restart."""
    from roundhouse.cluster.progress import RunMonitor
    from roundhouse.cluster.topology import write_rank_record
    from roundhouse.config.loading import validate_job
    from roundhouse.runs.rundir import RunDir

    job = validate_job(yaml.safe_load(write_job(tmp_path, "mon", {"name": "mlp"}).read_text()))
    run_dir = RunDir(str(tmp_path / "run"))
    old = {"rank": 0, "world_size": 2, "pid": 1, "started": 10.0, "resume_step": None}
    write_rank_record(run_dir, {**old, "rank": 1})
    write_rank_record(run_dir, old)  # an earlier invocation's record: ignored
    monitor = RunMonitor(job, run_dir, started=100.0)
    monitor.poll()
    assert monitor.restarts == 0 and monitor.attempts == []
    write_rank_record(run_dir, {**old, "pid": 2, "started": 101.0})
    monitor.poll()
    write_rank_record(run_dir, {**old, "pid": 3, "started": 150.0, "resume_step": 10})
    monitor.poll()
    assert monitor.restarts == 1
    # The world shrank to 1 when rank 0 wrote its record: rank 1's stale file is gone.
    write_rank_record(run_dir, {**old, "world_size": 1, "pid": 4, "started": 200.0})
    assert run_dir.listdir("ranks") == ["rank_0.json"]


def test_addresses_are_parsed_for_the_probe() -> None:
    from roundhouse.cluster.runtime import split_address

    assert split_address("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert split_address("ray://head:10001") == ("head", 10001)
    assert split_address("[::1]:6379") == ("::1", 6379)
    assert split_address("auto") is None


def test_worker_environment_travels_without_a_runtime_env_but_secrets_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker env goes in the train loop's config (Ray's prestarted workers stay usable);
    only a secret needs a runtime env, and it never enters that config."""
    from roundhouse.cluster.workers import worker_env, worker_runtime_env
    from roundhouse.config.loading import validate_job

    job = validate_job({"name": "env", "model": {"name": "mlp"}, "cluster": {"cpus_per_worker": 2}})
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert worker_runtime_env() is None
    monkeypatch.setenv("WANDB_API_KEY", "secret-key")
    assert worker_runtime_env() == {"env_vars": {"WANDB_API_KEY": "secret-key"}}
    env = worker_env(job)
    assert env["OMP_NUM_THREADS"] == "2" and env["DS_ACCELERATOR"] == "cpu"
    assert "secret-key" not in env.values()
