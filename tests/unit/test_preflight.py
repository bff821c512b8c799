"""The one pre-flight: every command runs the same checks, before anything starts.

`submit` and `tune` used to skip the LoRA and distillation checks, so a bad target was found
only once a cluster job or a sweep was running. Each command here runs in-process with a job
that is fine except for one adapter setting: exit 2, one `error:` line, nothing started (the
dashboard address is unreachable and Ray is never initialised).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

import roundhouse.trainer.checks as checks_module
from roundhouse.config.loading import validate_job
from roundhouse.errors import ModelError
from roundhouse.launch.cli import main
from roundhouse.trainer.checks import CHECKS, STRATEGY_CHECKS, JobUnderCheck, check_shapes
from roundhouse.trainer.preflight import preflight

UNREACHABLE = "http://127.0.0.1:1"
JOB = {
    "name": "pf",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 32},
    "trainer": {"max_steps": 2},
    "strategy": {"kind": "ring"},
    "cluster": {"num_workers": 2},
    "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
}
BAD_LORA = "model.lora={targets: ['nothing.*']}"
BAD_TEACHER = "trainer.distill={teacher: /no/such/teacher/run}"
COMMANDS = {
    "submit": ["submit", "job.yaml", "--address", UNREACHABLE],
    "tune": ["tune", "job.yaml", "--search", "trainer.optimizer.lr=choice(0.1,0.01)"],
    "plan": ["plan", "job.yaml", "--workers", "1"],
    "train": ["train", "job.yaml"],
}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    job = {**JOB, "storage": {"path": str(tmp_path / "runs")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    return tmp_path


def ray_started() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(
    ("override", "message"),
    [
        (BAD_LORA, "model.lora.targets ['nothing.*'] match no Linear or Conv layer of mlp"),
        (BAD_TEACHER, "/no/such/teacher/run"),
    ],
)
def test_every_command_refuses_a_bad_adapter_setting_before_anything_starts(
    project: Path, capsys: pytest.CaptureFixture, command: str, override: str, message: str
) -> None:
    assert main([*COMMANDS[command], override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "cannot reach" not in err[0]  # submit never contacted the dashboard
    assert not ray_started()
    assert not (project / "runs").exists()


def test_dry_run_prints_the_report(project: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "job.yaml", "--dry-run", "model.lora={targets: ['fc1']}"]) == 0
    out = capsys.readouterr().out
    assert "job 'pf' is valid" in out
    assert "world 2 = 2 data-parallel x 1 model-parallel (ring)" in out
    assert "input (1, 8, 8) -> output (10,)" in out
    assert "layer(s) get adapters" in out
    assert not (project / "runs").exists()


def test_the_data_and_the_model_are_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real_splits, real_model = checks_module.build_splits, checks_module.build_model_for

    def count_splits(*args, **kwargs):
        built.append("splits")
        return real_splits(*args, **kwargs)

    def count_model(*args, **kwargs):
        built.append("model")
        return real_model(*args, **kwargs)

    monkeypatch.setattr(checks_module, "build_splits", count_splits)
    monkeypatch.setattr(checks_module, "build_model_for", count_model)
    job = validate_job({**JOB, "model": {**JOB["model"], "lora": {"targets": ["fc1"]}}})
    report = preflight(job)
    assert report.checks == list(CHECKS) and built == ["splits", "model"]
    assert report.topology is not None and report.topology.world_size == 2


def test_strategy_checks_can_be_left_to_the_planner() -> None:
    job = validate_job({**JOB, "strategy": {"kind": "single"}})  # single on 2 workers: refused
    report = preflight(job, skip=STRATEGY_CHECKS)
    assert report.checks == [name for name in CHECKS if name not in STRATEGY_CHECKS]


class NeedsValues(torch.nn.Module):
    """A forward that reads a value (`.item()`): it cannot run on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(x.abs().max().item()) or 1.0
        return self.fc(x.flatten(1) / scale)


def test_a_forward_that_needs_values_is_not_refused_by_the_shape_check() -> None:
    subject = JobUnderCheck(validate_job(JOB), 2)
    with torch.device("meta"):
        subject.model = NeedsValues()  # stands where the job's model is cached
    lines = check_shapes(subject)
    assert "output shape not checked" in lines[0] and "650 parameters" in lines[0]


def test_a_model_that_cannot_take_the_input_is_refused() -> None:
    subject = JobUnderCheck(validate_job(JOB), 2)
    with torch.device("meta"):
        subject.model = torch.nn.Linear(10, 10)  # digits are (1, 8, 8): 64 features
    with pytest.raises(ModelError, match=r"cannot take input \(1, 8, 8\)"):
        check_shapes(subject)
