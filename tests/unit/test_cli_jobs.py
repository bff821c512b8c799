"""`roundhouse submit` / `jobs`: what gets submitted, secrets, addresses, exit codes, bad input.

The end-to-end runs against a real cluster are in tests/integration/test_submit.py.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path, PurePosixPath

import pytest
import yaml

from roundhouse.cluster.jobs import EXIT_CODES, JobsClient, dashboard_address, exit_code
from roundhouse.cluster.runtime import ClusterError
from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.launch.cli import main
from roundhouse.launch.submission import (
    DEFAULT_EXCLUDES,
    build_entrypoint,
    build_runtime_env,
    build_submission,
    job_path_in,
    storage_warning,
)

UNREACHABLE = "http://127.0.0.1:1"
KEY = "wandb-secret-0123456789abcdef"
JOB = {
    "name": "unit",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 32},
    "strategy": {"kind": "ring"},
    "cluster": {"num_workers": 2},
    "storage": {"path": "/shared/runs"},
}


def make_job(**cluster: object) -> object:
    data = yaml.safe_load(yaml.safe_dump(JOB))
    data["cluster"].update(cluster)
    return validate_job(data)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "job.yaml").write_text(yaml.safe_dump(JOB))
    return tmp_path


# --- entrypoint and working dir -----------------------------------------------------------------


def test_entrypoint_quotes_overrides_so_the_shell_returns_them_unchanged() -> None:
    overrides = ["trainer.max_steps=10", "name=a b", "tracking.wandb.tags=[x, 'y']", "x=$HOME;rm"]
    entrypoint = build_entrypoint(PurePosixPath("configs/job.yaml"), overrides)
    words = shlex.split(entrypoint)
    assert words[:5] == ["roundhouse", "train", "configs/job.yaml", "--address", "auto"]
    assert words[5:] == overrides


def test_job_path_is_relative_to_the_working_dir(project: Path) -> None:
    assert job_path_in(project, project / "configs" / "job.yaml") == PurePosixPath(
        "configs/job.yaml"
    )


def test_a_job_file_outside_the_working_dir_asks_for_working_dir(
    project: Path, tmp_path_factory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(JobFileError, match="--working-dir"):
        job_path_in(elsewhere, project / "configs" / "job.yaml")


def test_a_job_file_in_a_folder_that_is_never_uploaded_is_an_error(project: Path) -> None:
    (project / "runs").mkdir()
    job_file = project / "runs" / "job.yaml"
    job_file.write_text("x: 1")
    with pytest.raises(JobFileError, match="never uploaded"):
        job_path_in(project, job_file)


# --- runtime_env and secrets --------------------------------------------------------------------


def test_runtime_env_uploads_the_project_and_keeps_the_jobs_settings(project: Path) -> None:
    job = make_job(
        runtime_env={"pip": ["einops"], "excludes": ["data/"], "env_vars": {"NCCL_DEBUG": "INFO"}}
    )
    env = build_runtime_env(job, project, environ={})
    assert env["working_dir"] == str(project.resolve())
    assert env["pip"] == ["einops"]
    for excluded in (".venv/", ".git/", "runs/", ".cache/", "data/"):
        assert excluded in env["excludes"]
    assert env["env_vars"] == {"NCCL_DEBUG": "INFO"}
    assert job.cluster.runtime_env["excludes"] == ["data/"]  # the job itself is not changed


def test_wandb_key_and_extension_dir_are_forwarded_only_when_set(project: Path) -> None:
    job = make_job()
    assert "env_vars" not in build_runtime_env(job, project, environ={"HOME": "/root"})
    environ = {"WANDB_API_KEY": KEY, "TORCH_EXTENSIONS_DIR": "/cache/ext", "HOME": "/root"}
    env_vars = build_runtime_env(job, project, environ)["env_vars"]
    assert env_vars == {"WANDB_API_KEY": KEY, "TORCH_EXTENSIONS_DIR": "/cache/ext"}


def test_the_jobs_env_vars_win_and_become_strings(project: Path) -> None:
    job = make_job(runtime_env={"env_vars": {"TORCH_EXTENSIONS_DIR": "/node/ext", "N": 4}})
    env_vars = build_runtime_env(job, project, {"TORCH_EXTENSIONS_DIR": "/mine"})["env_vars"]
    assert env_vars == {"TORCH_EXTENSIONS_DIR": "/node/ext", "N": "4"}


def test_env_flag_forwards_named_variables_and_rejects_unset_ones(project: Path) -> None:
    job = make_job()
    environ = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "OTHER": "no"}
    env_vars = build_runtime_env(job, project, environ, forward=["AWS_SECRET_ACCESS_KEY"])
    assert env_vars["env_vars"] == {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    with pytest.raises(JobFileError, match="--env HF_TOKEN"):
        build_runtime_env(job, project, environ, forward=["HF_TOKEN"])


@pytest.mark.parametrize("name", ["WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"])
def test_a_secret_in_the_job_file_is_rejected(project: Path, name: str) -> None:
    job = make_job(runtime_env={"env_vars": {name: "value"}})
    with pytest.raises(JobFileError, match=f"{name} looks like a secret"):
        build_runtime_env(job, project, environ={})


def test_working_dir_in_the_job_file_is_rejected(project: Path) -> None:
    job = make_job(runtime_env={"working_dir": "/elsewhere"})
    with pytest.raises(JobFileError, match="working_dir is set by `roundhouse submit`"):
        build_runtime_env(job, project, environ={})


def test_submission_keeps_the_key_out_of_entrypoint_and_metadata(project: Path) -> None:
    job = make_job()
    submission = build_submission(
        job,
        project / "configs" / "job.yaml",
        ["trainer.max_steps=5"],
        project,
        {"WANDB_API_KEY": KEY},
    )
    assert KEY not in submission.entrypoint
    assert KEY not in str(submission.metadata)
    assert submission.runtime_env["env_vars"]["WANDB_API_KEY"] == KEY
    assert submission.metadata["roundhouse_job"] == "unit"
    assert all(isinstance(v, str) for v in submission.metadata.values())
    assert set(DEFAULT_EXCLUDES) <= set(submission.runtime_env["excludes"])


def test_storage_warning_only_for_relative_local_paths() -> None:
    job = make_job()
    assert storage_warning(job) is None
    assert (
        storage_warning(
            job.model_copy(
                update={"storage": job.storage.model_copy(update={"path": "s3://bucket/runs"})}
            )
        )
        is None
    )
    relative = job.model_copy(update={"storage": job.storage.model_copy(update={"path": "runs"})})
    assert "relative" in storage_warning(relative)


# --- addresses and exit codes -------------------------------------------------------------------


def test_dashboard_address_resolution() -> None:
    assert dashboard_address("http://head:8265/", {}) == "http://head:8265"
    assert dashboard_address("head:8265", {}) == "http://head:8265"
    assert dashboard_address(None, {"RAY_ADDRESS": "http://a:1"}) == "http://a:1"
    env = {"RAY_ADDRESS": "http://a:1", "RAY_API_SERVER_ADDRESS": "http://b:2"}
    assert dashboard_address(None, env) == "http://b:2"
    assert dashboard_address("http://c:3", env) == "http://c:3"
    with pytest.raises(ClusterError, match="no Ray cluster address"):
        dashboard_address(None, {})
    for wrong in ("ray://head:10001", "auto"):
        with pytest.raises(ClusterError, match="not a Ray dashboard address"):
            dashboard_address(wrong, {})


def test_exit_codes_reflect_the_outcome() -> None:
    assert [exit_code(s) for s in ("SUCCEEDED", "PENDING", "RUNNING")] == [0, 0, 0]
    assert exit_code("FAILED") == 1
    assert exit_code("STOPPED") == 3
    assert exit_code("SOMETHING_NEW") == 1  # an unknown status is not a success
    assert 2 not in EXIT_CODES.values()  # 2 is a user error


# --- the CLI on bad input -----------------------------------------------------------------------


def test_unreachable_dashboard_is_a_one_line_error_within_seconds(capsys) -> None:
    start = time.monotonic()
    with pytest.raises(
        ClusterError, match=r"cannot reach the Ray dashboard at http://127\.0\.0\.1:1"
    ):
        JobsClient(UNREACHABLE)
    assert main(["jobs", "list", "--address", UNREACHABLE]) == 2
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot reach the Ray dashboard at http://127.0.0.1:1")
    assert len(err.splitlines()) == 1


def test_submit_validates_the_job_before_contacting_the_cluster(
    project: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(project)
    # The override comes after an option, as with `train`; the address is unreachable, so an
    # error naming the model proves nothing was contacted.
    code = main(["submit", "configs/job.yaml", "--address", UNREACHABLE, "model.name=nope"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'nope'")
    assert "cannot reach" not in err


def test_submit_checks_topology_for_the_cluster(project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(project)
    assert (
        main(["submit", "configs/job.yaml", "strategy.kind=single", "--address", UNREACHABLE]) == 2
    )
    assert "strategy.kind=single runs on one worker" in capsys.readouterr().err


def test_submit_a_valid_job_to_an_unreachable_dashboard(project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(project)
    assert main(["submit", "configs/job.yaml", "--address", UNREACHABLE, "--wait"]) == 2
    assert "error: cannot reach the Ray dashboard" in capsys.readouterr().err


def test_submit_with_a_job_file_outside_the_working_dir(project: Path, monkeypatch, capsys) -> None:
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    assert main(["submit", "../configs/job.yaml", "--address", UNREACHABLE]) == 2
    assert "pass --working-dir" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["jobs", "--address", UNREACHABLE, "list"], ["jobs", "status", "x", "--address", UNREACHABLE]],
)
def test_address_is_accepted_before_or_after_the_subcommand(argv: list[str], capsys) -> None:
    assert main(argv) == 2
    assert "cannot reach the Ray dashboard at http://127.0.0.1:1" in capsys.readouterr().err


def test_jobs_without_an_address_is_an_error(monkeypatch, capsys) -> None:
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["jobs", "list"]) == 2
    assert "error: no Ray cluster address given" in capsys.readouterr().err
