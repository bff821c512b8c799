"""`roundhouse submit` and `roundhouse jobs` against a real Ray cluster started with `ray start`.

One head (dashboard on 127.0.0.1, token authentication as Ray enables by default) plus a second
node, both on this machine. The job runs its 2 ring workers with `placement: strict_spread`, so
one rank runs on each node. Everything the cluster started is killed by process id at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from tests.helpers.ray_cluster import RayCluster, start_cluster
from tests.helpers.runs import only_run, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDHOUSE = str(Path(sys.executable).with_name("roundhouse"))
KEY = "wandb-test-key-5f3c9a1e7d"
CLI_TIMEOUT_S = 240
JOB = {
    "name": "submitted",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 32},
    "trainer": {"max_steps": 10, "log_every_steps": 5, "optimizer": {"name": "sgd", "lr": 0.1}},
    "strategy": {"kind": "ring"},
    "cluster": {"num_workers": 2, "cpus_per_worker": 1, "placement": "strict_spread"},
    "tracking": {"wandb": {"mode": "disabled"}, "console": "plain"},
}


@dataclass
class Setup:
    cluster: RayCluster
    project: Path
    storage: Path

    def start(self, *args: str, secret: bool = False) -> subprocess.Popen:
        """Start `roundhouse ARGS` in the project with the cluster's address and token."""
        env = dict(self.cluster.env)
        if secret:
            env["WANDB_API_KEY"] = KEY
        return subprocess.Popen(
            [ROUNDHOUSE, *args, "--address", self.cluster.dashboard_url],
            cwd=self.project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cli(self, *args: str, secret: bool = False) -> subprocess.CompletedProcess:
        """Run `roundhouse ARGS` to the end (at most CLI_TIMEOUT_S)."""
        return finish(self.start(*args, secret=secret))

    def job_details(self, job_id: str) -> dict:
        """The job as the Jobs REST API reports it (runtime_env included)."""
        token = self.cluster.env["RAY_AUTH_TOKEN"]
        reply = requests.get(
            f"{self.cluster.dashboard_url}/api/jobs/{job_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        reply.raise_for_status()
        return reply.json()


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for a started command (killing it after CLI_TIMEOUT_S) and return its result."""
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text else ""


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Iterator[Setup]:
    project = tmp_path_factory.mktemp("project")
    storage = tmp_path_factory.mktemp("storage")
    job = {**JOB, "storage": {"path": str(storage)}}
    (project / "configs").mkdir()
    (project / "configs" / "job.yaml").write_text(yaml.safe_dump(job))
    cluster = start_cluster(head_cpus=2, extra_nodes=(1,))
    try:
        yield Setup(cluster, project, storage)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def runs(setup: Setup) -> dict[str, subprocess.CompletedProcess]:
    """All submissions, overlapped to save time: while a job that fails on the cluster runs
    (`submit --wait` in the background), an invalid job is refused, a long job is submitted and
    stopped, then the tiny job runs with `submit --wait` and a W&B key in the environment."""
    failing = setup.start("submit", "configs/job.yaml", "--wait", "storage.path=/proc/roundhouse")
    try:
        bad = setup.cli("submit", "configs/job.yaml", "--wait", "trainer.max_steps=-1")
        # Its own job name: it may create a run folder before it is stopped.
        long = setup.cli("submit", "configs/job.yaml", "trainer.max_steps=100000", "name=long")
        stop = setup.cli("jobs", "stop", first_line(long.stdout))
        ok = setup.cli("submit", "configs/job.yaml", "--wait", secret=True)
    finally:
        failed = finish(failing)
    return {"failed": failed, "bad": bad, "long": long, "stop": stop, "ok": ok}


@pytest.fixture(scope="module")
def succeeded(runs) -> tuple[subprocess.CompletedProcess, str]:
    return runs["ok"], first_line(runs["ok"].stdout)


def test_submit_wait_trains_on_two_nodes_and_succeeds(setup: Setup, succeeded) -> None:
    result, job_id = succeeded
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert job_id.startswith("raysubmit_")
    assert f"job {job_id} SUCCEEDED" in result.stderr
    assert "step 10/10" in result.stdout  # the training output was streamed
    run = only_run(setup.storage, "submitted")
    assert read_metrics(run)[-1]["step"] == 10
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_10"
    ranks = [json.loads((run / "ranks" / f"rank_{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]  # strict_spread: one rank per node
    details = setup.job_details(job_id)
    assert details["entrypoint"] == "roundhouse train configs/job.yaml --address auto"
    assert details["metadata"]["roundhouse_job"] == "submitted"


@pytest.fixture(scope="module")
def views(setup: Setup, succeeded) -> dict[str, subprocess.CompletedProcess]:
    """`jobs status`, `jobs logs` and `jobs list` after the job succeeded."""
    _, job_id = succeeded
    return {
        "status": setup.cli("jobs", "status", job_id),
        "logs": setup.cli("jobs", "logs", job_id),
        "list": setup.cli("jobs", "list"),
    }


def test_jobs_status_logs_and_list_show_the_job(succeeded, views) -> None:
    _, job_id = succeeded
    assert views["status"].returncode == 0, views["status"].stderr
    assert "SUCCEEDED" in views["status"].stdout
    assert views["logs"].returncode == 0
    assert "step 10/10" in views["logs"].stdout and "test/accuracy" in views["logs"].stdout
    assert views["list"].returncode == 0
    row = next(line for line in views["list"].stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "roundhouse train configs/job.yaml" in row


def test_polling_fallback_prints_the_same_logs(setup: Setup, succeeded, views) -> None:
    # What `follow` does when the websocket log stream breaks, run in a fresh process (Ray
    # caches the auth token per process).
    _, job_id = succeeded
    script = (
        "import sys; from roundhouse.cluster.jobs import JobsClient; "
        f"JobsClient({setup.cluster.dashboard_url!r})._poll_logs({job_id!r}, sys.stdout.write)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=setup.cluster.env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == views["logs"].stdout


def test_wandb_key_reaches_the_job_but_is_never_written(setup: Setup, succeeded, views) -> None:
    result, job_id = succeeded
    assert setup.job_details(job_id)["runtime_env"]["env_vars"]["WANDB_API_KEY"] == KEY
    for text in [result.stdout, result.stderr, *(v.stdout for v in views.values())]:
        assert KEY not in text
    run = only_run(setup.storage, "submitted")
    for path in (run / "job.yaml", run / "metrics.jsonl"):
        assert KEY not in path.read_text()
    assert "env_vars" not in json.dumps(yaml.safe_load((run / "job.yaml").read_text()))


def test_a_job_failing_on_the_cluster_fails_wait_and_status(setup: Setup, runs) -> None:
    # Valid here, but the cluster cannot create the run folder: the job's driver exits 2.
    result = runs["failed"]
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    job_id = first_line(result.stdout)
    assert f"job {job_id} FAILED" in result.stderr
    assert "cannot write to storage path" in result.stdout
    status = setup.cli("jobs", "status", job_id)
    assert status.returncode == 1 and "FAILED" in status.stdout


def test_stop_a_running_job(setup: Setup, runs) -> None:
    assert runs["long"].returncode == 0, runs["long"].stderr
    job_id = first_line(runs["long"].stdout)
    assert runs["stop"].returncode == 0, runs["stop"].stderr
    assert f"job {job_id} STOPPED" in runs["stop"].stdout
    status = setup.cli("jobs", "status", job_id)
    assert status.returncode == 3 and "STOPPED" in status.stdout


def test_a_bad_job_is_not_submitted(runs, views) -> None:
    result = runs["bad"]
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "max_steps" in result.stderr
    assert result.stdout == ""
    assert "max_steps=-1" not in views["list"].stdout


def test_unknown_job_id_is_a_one_line_error(setup: Setup) -> None:
    result = setup.cli("jobs", "logs", "raysubmit_doesnotexist")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no job 'raysubmit_doesnotexist'")


def test_missing_token_names_the_fix(setup: Setup) -> None:
    env = {k: v for k, v in setup.cluster.env.items() if not k.startswith("RAY_AUTH")}
    result = subprocess.run(
        [ROUNDHOUSE, "jobs", "list", "--address", setup.cluster.dashboard_url],
        env={**env, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 2
    assert "RAY_AUTH_TOKEN" in result.stderr and len(result.stderr.strip().splitlines()) == 1
