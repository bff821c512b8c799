"""Job files: validation, overrides and the one-line errors they produce."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from roundhouse.config import JobSpec, RingStrategyConfig
from roundhouse.config.loading import apply_overrides, load_job, read_yaml, validate_job
from roundhouse.errors import JobFileError

MINIMAL = {"name": "t", "model": {"name": "mlp"}}


def write(tmp_path: Path, data: object, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_defaults_fill_every_section() -> None:
    job = validate_job(dict(MINIMAL))
    assert job.strategy.kind == "single"
    assert job.data.batch_size == 64 and job.data.split == (0.8, 0.1, 0.1)
    assert job.trainer.optimizer.name == "adam" and job.trainer.optimizer.betas == (0.9, 0.999)
    assert job.storage.path == "./runs"


def test_quickstart_config_is_valid() -> None:
    job = load_job(Path(__file__).parents[2] / "configs" / "quickstart.yaml")
    assert job.name == "quickstart"


def test_overrides_are_typed_by_the_schema(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    job = load_job(
        path, ["trainer.max_epochs=3", "trainer.optimizer.lr=1e-2", "data.shuffle=false"]
    )
    assert job.trainer.max_epochs == 3
    assert job.trainer.optimizer.lr == pytest.approx(0.01)
    assert job.data.shuffle is False


def test_override_switches_the_strategy_union(tmp_path: Path) -> None:
    job = load_job(write(tmp_path, MINIMAL), ["strategy.kind=ring", "strategy.bucket_mb=4"])
    assert isinstance(job.strategy, RingStrategyConfig) and job.strategy.bucket_mb == 4


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path: Path) -> None:
    path = write(tmp_path, {**MINIMAL, "trainer": {"optimzer": {"lr": 1}}})
    with pytest.raises(JobFileError) as info:
        load_job(path)
    assert "'trainer.optimzer'" in info.value.what
    assert "optimizer" in info.value.fix and "max_epochs" in info.value.fix


def test_unknown_key_inside_a_strategy_lists_that_strategys_keys() -> None:
    with pytest.raises(JobFileError) as info:
        validate_job({**MINIMAL, "strategy": {"kind": "ring", "bucket": 1}})
    assert "strategy.bucket" in info.value.what
    assert "bucket_mb" in info.value.fix and "hierarchical" in info.value.fix


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs"),
        ("data.batch_size=0", "greater than 0"),
        ("data.batch_size=-3", "data.batch_size"),
        ("strategy.kind=magic", "magic"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("data.split=[0.5,0.1,0.1]", "sum to 1"),
    ],
)
def test_wrong_values_are_one_line_errors(tmp_path: Path, override: str, fragment: str) -> None:
    with pytest.raises(JobFileError) as info:
        load_job(write(tmp_path, MINIMAL), [override])
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(JobFileError, match="does not exist"):
        read_yaml(tmp_path / "nope.yaml")
    with pytest.raises(JobFileError, match=r"invalid YAML .* line \d+, column"):
        read_yaml(write(tmp_path, "name: x\nmodel: [unclosed\n"))
    with pytest.raises(JobFileError, match="must be a mapping"):
        read_yaml(write(tmp_path, "- a\n- b\n"))


def test_missing_required_key() -> None:
    with pytest.raises(JobFileError, match="missing required key 'model'"):
        validate_job({"name": "t"})


def test_bad_override_syntax() -> None:
    with pytest.raises(JobFileError, match=r"key\.sub=value"):
        apply_overrides({}, ["trainer.max_epochs"])
    with pytest.raises(JobFileError, match="not a section"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_schema_covers_every_section() -> None:
    schema = JobSpec.model_json_schema()
    assert set(schema["properties"]) == {
        "name",
        "model",
        "task",
        "data",
        "trainer",
        "strategy",
        "cluster",
        "tracking",
        "storage",
    }


def test_yaml_off_means_console_off(tmp_path: Path) -> None:
    """YAML 1.1 parses a bare `off` as False."""
    job = load_job(write(tmp_path, "name: t\nmodel: {name: mlp}\ntracking: {console: off}\n"))
    assert job.tracking.console == "off"
    assert load_job(write(tmp_path, MINIMAL), ["tracking.console=off"]).tracking.console == "off"


def test_ps_data_assignment_defaults_and_conflicts() -> None:
    def ps(mode: str, assignment: str | None = None, **trainer: object) -> JobSpec:
        strategy = {"kind": "ps", "mode": mode, "data_assignment": assignment}
        return validate_job({**MINIMAL, "strategy": strategy, "trainer": trainer})

    assert ps("sync").strategy.data_assignment == "static"
    assert ps("async").strategy.data_assignment == "dynamic"
    assert ps("ssp").strategy.data_assignment == "dynamic"
    assert ps("async", max_steps=10).strategy.data_assignment == "static"
    assert ps("async", "static").strategy.data_assignment == "static"
    with pytest.raises(JobFileError, match=r"needs strategy\.mode async or ssp"):
        ps("sync", "dynamic")
    with pytest.raises(JobFileError, match=r"trainer\.eval_every_steps") as info:
        ps("async", "dynamic", eval_every_steps=5)
    assert "\n" not in str(info.value)


def test_with_strategy_replaces_the_section_and_keeps_the_rest() -> None:
    job = validate_job({**MINIMAL, "trainer": {"max_epochs": 2}})
    ring = job.with_strategy({"kind": "ring", "bucket_mb": 4})
    assert isinstance(ring.strategy, RingStrategyConfig) and ring.strategy.bucket_mb == 4
    assert ring.trainer.max_epochs == 2 and job.strategy.kind == "single"  # job is unchanged
    assert job.with_strategy(ring.strategy).strategy == ring.strategy  # a section object too


def test_with_strategy_gives_the_one_line_error() -> None:
    job = validate_job(dict(MINIMAL))
    with pytest.raises(JobFileError, match=r"^elastic: unknown key 'strategy.nope'.*valid keys"):
        job.with_strategy({"kind": "ring", "nope": 1}, source="elastic")


def test_a_run_folder_job_yaml_is_read_with_the_one_line_errors(tmp_path: Path) -> None:
    from roundhouse.runs.rundir import RunDir
    from roundhouse.weights.saved_model import read_run_job

    write(tmp_path, {**MINIMAL, "trainer": {"max_epochs": "many"}})
    with pytest.raises(JobFileError, match=r"job.yaml: trainer.max_epochs: .*'many'.*this version"):
        read_run_job(RunDir(str(tmp_path)))
    write(tmp_path, MINIMAL)
    assert read_run_job(RunDir(str(tmp_path))).name == "t"
