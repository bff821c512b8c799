"""`roundhouse tune` input checks and `--folds`: every mistake is one line, exit 2, before Ray.
Also the Ray Train settings an embedded cluster (a sweep's or a run's) starts with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from roundhouse.cluster.sweep.space import SearchError, check_params, parse_search
from roundhouse.config import JobSpec
from roundhouse.data import build_splits
from roundhouse.data.folds import rotate_fold
from roundhouse.launch.cli import main
from roundhouse.launch.folds import summarize_folds

JOB = {
    "name": "t",
    "model": {"name": "mlp", "flavor": "debug"},
    "data": {"source": "builtin:digits", "batch_size": 32},
    "trainer": {"max_steps": 4},
    "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
}


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**JOB, "storage": {"path": str(tmp_path / "runs")}}))
    return path


def test_expressions_parse_into_kinds_and_values() -> None:
    lr = parse_search("trainer.optimizer.lr=loguniform(1e-4, 1e-2)")
    assert (lr.key, lr.kind, lr.values) == ("trainer.optimizer.lr", "loguniform", (1e-4, 1e-2))
    drop = parse_search("model.options.dropout=choice(0,0.1,0.3)")
    assert drop.kind == "choice" and drop.values == (0, 0.1, 0.3)
    assert parse_search("trainer.optimizer.name=grid('sgd','adam')").values == ("sgd", "adam")


@pytest.mark.parametrize(
    "text",
    [
        "lr",
        "trainer.optimizer.lr=",
        "a.b=normal(0,1)",
        "a.b=uniform(1)",
        "a.b=uniform(2,1)",
        "a.b=loguniform(0,1)",
        "a.b=randint(0.5,3)",
        "a.b=choice()",
        "a.b=choice(os.system)",
    ],
)
def test_bad_expressions_are_search_errors(text: str) -> None:
    with pytest.raises(SearchError):
        parse_search(text)


def test_keys_and_values_are_checked_against_the_schema() -> None:
    job = JobSpec.model_validate(JOB)
    check_params(job, [parse_search("model.options.dropout=choice(0,0.5)")])  # free-form dict
    with pytest.raises(SearchError, match="unknown key"):
        check_params(job, [parse_search("trainer.optimizer.lrr=uniform(0.1,1)")])
    with pytest.raises(SearchError, match="greater than 0"):
        check_params(job, [parse_search("trainer.optimizer.lr=choice(0.1,-1)")])


def test_searched_task_options_are_checked_by_the_task() -> None:
    """Task options are a free-form dict: the task itself checks each searched value."""
    job = JobSpec.model_validate({**JOB, "model": {"name": "bert", "flavor": "debug"}})
    check_params(job, [parse_search("task.options.masking=choice('dynamic','static')")])
    with pytest.raises(SearchError, match="masking must be dynamic or static, got 'sometimes'"):
        check_params(job, [parse_search("task.options.masking=choice('dynamic','sometimes')")])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--search", "trainer.optimizer.lrr=uniform(0.1,1)"], "unknown key"),
        (["--search", "trainer.optimizer.lr=gauss(1,2)"], "not a search expression"),
        (
            ["--search", "trainer.optimizer.lr=uniform(0.1,1)", "--metric", "val/bleu"],
            "never logged",
        ),
        (
            ["--search", "trainer.optimizer.lr=uniform(0.1,1)", "--searcher", "grid"],
            "cannot enumerate",
        ),
        ([], "nothing to search"),
    ],
)
def test_tune_bad_input_is_one_line_exit_2_and_writes_nothing(
    job_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    assert main(["tune", str(job_file), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "runs").exists()


def test_folds_on_a_streamed_dataset_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job = {**JOB, "data": {"train": {"url": str(tmp_path / "shards")}, "batch_size": 32}}
    job["storage"] = {"path": str(tmp_path / "runs")}
    path = tmp_path / "streamed.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path), "--local", "--folds", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--folds needs an in-memory data.source" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_folds_rotate_validation_over_every_train_val_sample_once() -> None:
    order = torch.randperm(103, generator=torch.Generator().manual_seed(0))
    sizes = (80, 10, 13)
    seen = []
    for index in range(4):
        (n_train, n_val, n_test), reordered = rotate_fold(order, sizes, (index, 4))
        assert n_train + n_val == 90 and n_test == 13
        assert sorted(reordered.tolist()) == list(range(103))
        assert reordered[-13:].tolist() == order[-13:].tolist()  # test split unchanged
        seen += reordered[n_train : n_train + n_val].tolist()
    assert sorted(seen) == sorted(order[:90].tolist())


def test_fold_splits_differ_in_val_and_share_test() -> None:
    base = JobSpec.model_validate(JOB).data
    splits = [build_splits(base.model_copy(update={"fold": (i, 3)}), seed=0) for i in range(3)]
    vals = [{tuple(s.val[j]["input"].flatten().tolist()) for j in range(8)} for s in splits]
    assert vals[0] != vals[1] != vals[2]
    assert torch.equal(splits[0].test[0]["input"], splits[2].test[0]["input"])


def test_fold_summary_is_mean_and_sample_std() -> None:
    summary = summarize_folds([{"val/accuracy": 0.9}, {"val/accuracy": 0.8}, {"test/x": 1.0}])
    mean, std = summary["val/accuracy"]
    assert mean == pytest.approx(0.85) and std == pytest.approx(0.0707, abs=1e-3)
    assert "test/x" not in summary


def test_folds_local_trains_k_runs_and_prints_mean_std(
    job_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["train", str(job_file), "--local", "--folds", "2"]) == 0
    out = capsys.readouterr().out
    assert "val/accuracy" in out and "± " in out and "over 2 folds" in out
    groups = list((tmp_path / "runs" / "t").glob("folds-*"))
    assert len(groups) == 1
    folds = sorted(p.name for p in groups[0].iterdir())
    assert folds == ["fold-0", "fold-1"]
    saved = yaml.safe_load((groups[0] / "fold-1" / "job.yaml").read_text())
    assert saved["data"]["fold"] == [1, 2]


def test_embedded_train_settings_fill_only_unset_variables_and_are_undone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.train.v2._internal import constants

    from roundhouse.cluster.runtime import EMBEDDED_TRAIN_ENV, scoped_env

    # the names are Ray Train's own (a typo would silently change nothing)
    assert set(EMBEDDED_TRAIN_ENV) == {
        constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR,
        constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR,
    }
    monkeypatch.setenv(constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR, "3")
    monkeypatch.delenv(constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR, raising=False)
    with scoped_env(EMBEDDED_TRAIN_ENV):
        assert os.environ[constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR] == "0"
        assert os.environ[constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "3"  # the user's wins
    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR not in os.environ
    assert os.environ[constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR] == "3"
