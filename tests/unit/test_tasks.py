"""The Task seam: `task:` names a registered task or `module:Class`; bad tasks and optimizer
globs are one-line errors before anything is written; several optimizers train, checkpoint
and resume exactly under `single`; early stopping selects on the task's own metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from roundhouse.config.loading import validate_job
from roundhouse.launch.cli import main
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.preflight import preflight
from roundhouse.trainer.task import ClassificationTask, build_job_task
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.runs import final_weights, read_metrics

EXAMPLE = "examples.my_task"


def job_dict(tmp_path: Path, **sections: Any) -> dict:
    job = {
        "name": "tasks",
        "model": {"name": f"{EXAMPLE}:AutoencoderClassifier", "options": {"hidden": 16}},
        "task": {"name": f"{EXAMPLE}:ClassifyAndReconstruct"},
        "data": {"source": "builtin:digits", "batch_size": 64},
        "trainer": {
            "max_steps": 6,
            "log_every_steps": 2,
            "device": "cpu",
            "optimizer": {"name": "adam", "lr": 0.01},
            "checkpoint": {"every_epoch": False, "every_steps": 3, "keep_last": 5},
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(tmp_path / "runs"), "run_id": "r"},
    }
    job.update(sections)
    return job


def run_cli(tmp_path: Path, job: dict, *args: str) -> int:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return main(["train", str(path), "--local", *args])


def test_without_task_the_models_own_task_is_used(tmp_path: Path) -> None:
    job = job_dict(tmp_path, model={"name": "mlp"})
    del job["task"]
    assert isinstance(build_job_task(validate_job(job)), ClassificationTask)
    job["task"] = "classification"  # a plain string is the name
    assert validate_job(job).task.name == "classification"


BAD_TASKS = {
    "examples.no_such_module:Task": "does not import",
    f"{EXAMPLE}:AutoencoderClassifier": "is not a Task class",
    "no_such_task": "is not registered",
}


@pytest.mark.parametrize("name", list(BAD_TASKS))
def test_a_bad_task_is_one_line_at_exit_2_with_nothing_written(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture
) -> None:
    job = job_dict(tmp_path, task={"name": name})
    assert run_cli(tmp_path, job) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and BAD_TASKS[name] in err[0]
    assert not (tmp_path / "runs").exists()


BAD_OPTIMIZERS = {
    "another optimizer's": ({"decoder": {"params": ["classifier.*"]}}, "belongs to optimizers"),
    "none": ({"decoder": {"params": ["nothing.*"]}}, "match no trainable parameter"),
    "unknown name": ({"critic": {"params": ["decoder.*"]}}, "has no optimizer 'critic'"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIMIZERS))
def test_optimizer_globs_must_name_parameters_of_their_own(tmp_path: Path, case: str) -> None:
    optimizers, message = BAD_OPTIMIZERS[case]
    job = job_dict(tmp_path, task={"name": f"{EXAMPLE}:ClassifyAndReconstruct"})
    job["task"]["optimizers"] = optimizers
    with pytest.raises(Exception, match=message) as info:
        preflight(validate_job(job), 1)
    assert len(str(info.value).splitlines()) == 1
    assert run_cli(tmp_path, job) == 2
    assert not (tmp_path / "runs").exists()


REFUSED_LAYOUTS = {
    "zero3": ({"kind": "deepspeed", "zero_stage": 3}, "zero_stage=3"),
    "offload": (
        {"kind": "deepspeed", "zero_stage": 2, "offload_optimizer": "cpu"},
        "offload",
    ),
    "ps with one server": ({"kind": "ps", "num_servers": 1}, "num_servers=1"),
}


@pytest.mark.parametrize("case", list(REFUSED_LAYOUTS))
def test_layouts_that_cannot_step_several_optimizers_are_refused(tmp_path: Path, case: str) -> None:
    strategy, message = REFUSED_LAYOUTS[case]
    job = job_dict(tmp_path, strategy=strategy)
    with pytest.raises(Exception, match=message):
        preflight(validate_job(job), 1)


def test_a_one_optimizer_task_is_not_a_task_error_for_those_layouts(tmp_path: Path) -> None:
    job = job_dict(tmp_path, model={"name": "mlp"}, strategy={"kind": "deepspeed", "zero_stage": 3})
    del job["task"]
    report = preflight(validate_job(job), 1)
    assert "optimizers" in report.checks  # the optimizer check ran and let ZeRO-3 through
    assert "task classification" in report.lines


def train_local(job: dict, resume: bool = False) -> Path:
    prepared = prepare_run(validate_job(job))
    run_worker(prepared.job, build_local_context("cpu"), resume=resume)
    return Path(prepared.run_dir.url)


def test_two_optimizers_train_log_and_resume_exactly(tmp_path: Path) -> None:
    job = job_dict(tmp_path)
    job["task"]["optimizers"] = {"decoder": {"optimizer": {"name": "sgd", "lr": 0.5}}}
    full = train_local(job)
    rows = [r for r in read_metrics(full) if "train/loss_body" in r]
    assert rows and all(r["train/lr_body"] == 0.01 and r["train/lr_decoder"] == 0.5 for r in rows)
    assert all(
        r["train/loss"] == pytest.approx(r["train/loss_body"] + r["train/loss_decoder"])
        for r in rows
    )
    half = {**job, "storage": {**job["storage"], "run_id": "half"}}
    train_local({**half, "trainer": {**job["trainer"], "max_steps": 3}})
    resumed = train_local(half, resume=True)
    a, b = final_weights(full), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(resumed / "checkpoints" / "step_6" / "state.pt", weights_only=True)
    optimizers = state["strategy"]["optimizers"]
    assert set(optimizers) == {"body", "decoder"}
    assert optimizers["decoder"]["optimizer"]["param_groups"][0]["lr"] == 0.5


def test_early_stopping_selects_on_the_tasks_metric(tmp_path: Path) -> None:
    """The example's metric is val/accuracy, to maximize: absent from the job, it is used."""
    job = job_dict(tmp_path)
    job["trainer"].update(
        max_steps=40, eval_every_steps=2, early_stopping={"patience": 1, "min_delta": 0.5}
    )
    run = train_local(job)
    evals = [r for r in read_metrics(run) if "val/accuracy" in r]
    # accuracy never rises by 0.5 between two evaluations: stopped at the second one
    assert evals[0]["step"] == 2 and evals[-1]["step"] == 4


def test_tune_may_select_on_the_metrics_a_task_declares(tmp_path: Path) -> None:
    from roundhouse.cluster.sweep.space import known_metrics

    assert known_metrics(validate_job(job_dict(tmp_path))) == ["val/accuracy", "val/loss"]
    gan = job_dict(tmp_path, model={"name": "dcgan"}, task={"options": {"fid_classifier": "x"}})
    assert "val/fid" in known_metrics(validate_job(gan))
    plain = job_dict(tmp_path, model={"name": "mlp"})
    del plain["task"]
    assert "val/top5_accuracy" in known_metrics(validate_job(plain))


@pytest.mark.parametrize(
    ("model", "data", "metric"),
    [
        ({"name": "seq2seq", "flavor": "debug"}, {"source": "builtin:pydoc-pairs"}, "val/bleu"),
        (
            {"name": "bert_classifier", "flavor": "debug"},
            {"source": "builtin:pydoc-cls"},
            "val/macro_f1",
        ),
        ({"name": "gpt", "flavor": "debug"}, {"source": "builtin:pytext"}, "val/perplexity"),
    ],
)
def test_each_built_in_task_declares_the_metrics_tune_may_select_on(
    tmp_path: Path, model: dict, data: dict, metric: str
) -> None:
    """The task, not a table in the sweep code, says what `tune --metric` may name."""
    from roundhouse.cluster.sweep.space import known_metrics

    job = job_dict(tmp_path, model=model)
    del job["task"]
    job["data"] = {**data, "batch_size": 8}
    assert metric in known_metrics(validate_job(job))
