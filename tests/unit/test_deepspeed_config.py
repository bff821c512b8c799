"""The generated ds_config, raw-vs-typed conflicts and DeepSpeed topology checks (no deepspeed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from roundhouse.config.loading import validate_job
from roundhouse.config.topology import Topology
from roundhouse.errors import JobFileError
from roundhouse.launch.cli import main
from roundhouse.parallel.deepspeed.config import EngineOptions, build_ds_config
from roundhouse.trainer.preflight import preflight


def job(strategy: dict | None = None, **sections) -> dict:
    data = {
        "name": "ds",
        "model": {"name": "mlp"},
        "data": {"batch_size": 32},
        "trainer": {"max_steps": 2, "grad_accum_steps": 2, "grad_clip_norm": 0.5},
        "strategy": {"kind": "deepspeed", **(strategy or {})},
        "cluster": {"num_workers": 4},
    }
    data.update(sections)
    return data


def ds_config(strategy: dict | None = None, world: int = 4, **sections) -> dict:
    spec = validate_job(job(strategy, **sections))
    return build_ds_config(spec.strategy, Topology.of_job(spec, world), EngineOptions.of_job(spec))


def test_generated_from_the_job() -> None:
    config = ds_config({"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"})
    assert config["train_micro_batch_size_per_gpu"] == 4  # 32 / (4 ranks x 2 accumulation)
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 32
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "cpu"},
    }


def test_no_clipping_is_written_explicitly() -> None:
    # DeepSpeed's own default is 1.0: leaving the key out would clip a job that asked for none.
    data = job()
    data["trainer"].pop("grad_clip_norm")
    spec = validate_job(data)
    assert (
        build_ds_config(spec.strategy, Topology.of_job(spec, 4), EngineOptions.of_job(spec))[
            "gradient_clipping"
        ]
        == 0.0
    )


def test_raw_keys_merge_last() -> None:
    raw = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000}, "comms_logger": {}}
    config = ds_config({"zero_stage": 2, "config": raw})
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert config["comms_logger"] == {}


@pytest.mark.parametrize(
    ("strategy", "names"),
    [
        (
            {"zero_stage": 2, "config": {"zero_optimization": {"stage": 1}}},
            ["zero_optimization.stage=1", "strategy.zero_stage"],
        ),
        (
            {"config": {"gradient_accumulation_steps": 4}},
            ["gradient_accumulation_steps=4", "trainer.grad_accum_steps"],
        ),
        ({"config": {"gradient_clipping": 1.0}}, ["gradient_clipping", "trainer.grad_clip_norm"]),
        (
            {"config": {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}},
            ["offload_optimizer.device='cpu'", "strategy.offload_optimizer"],
        ),
        ({"config": {"optimizer": {"type": "Adam"}}}, ["strategy.config.optimizer", "trainer."]),
    ],
)
def test_raw_key_contradicting_a_typed_field_names_both(strategy: dict, names: list) -> None:
    with pytest.raises(JobFileError) as err:
        ds_config(strategy)
    for name in names:
        assert name in str(err.value)


def test_raw_key_agreeing_with_a_typed_field_is_fine() -> None:
    config = ds_config({"zero_stage": 1, "config": {"zero_optimization": {"stage": 1.0}}})
    assert config["zero_optimization"]["stage"] == 1.0


@pytest.mark.parametrize(
    ("strategy", "workers", "model", "message"),
    [
        ({"pipeline_stages": 3}, 4, "mlp", "3 does not divide the world size 4"),
        ({"expert_parallel": 4, "tensor_parallel": 2}, 4, "moe", "expert_parallel=4 does not"),
        ({"expert_parallel": 3}, 3, "moe", "num_experts=4 is not divisible by expert_parallel=3"),
        ({"expert_parallel": 2}, 2, "mlp", "needs an MoE model"),
        ({"offload_params": "cpu", "zero_stage": 2}, 2, "mlp", "needs zero_stage=3"),
        ({"pipeline_stages": 2, "zero_stage": 2}, 2, "resnet", "ZeRO stages 0 and 1"),
        ({"pipeline_stages": 2, "zero_stage": 1}, 2, "gpt", "tie_weights=false"),
        ({"pipeline_stages": 2, "zero_stage": 1}, 2, "moe", "has experts"),
        ({"pipeline_stages": 2, "tensor_parallel": 2}, 4, "gpt", "one of"),
    ],
)
def test_topology_errors_before_anything_starts(
    strategy: dict, workers: int, model: str, message: str
) -> None:
    data = job(strategy, cluster={"num_workers": workers}, model={"name": model})
    data["trainer"]["grad_accum_steps"] = 1
    with pytest.raises(JobFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        preflight(validate_job(data))


def test_expert_parallel_message_has_the_arithmetic() -> None:
    data = job({"expert_parallel": 4, "tensor_parallel": 2}, model={"name": "moe"})
    data["trainer"]["grad_accum_steps"] = 1
    with pytest.raises(JobFileError) as err:
        preflight(validate_job(data))
    assert "data-parallel size 2 (= world 4 / (pipeline_stages 1 x tensor_parallel 2))" in str(
        err.value
    )


def test_dry_run_reports_a_conflict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job({"zero_stage": 2})))
    code = main(["train", str(path), "--dry-run", "strategy.config.zero_optimization.stage=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "zero_optimization.stage=3" in err and "strategy.zero_stage" in err


def test_import_roundhouse_does_not_import_deepspeed() -> None:
    code = (
        "import sys, roundhouse, roundhouse.trainer, roundhouse.launch.cli, "
        "roundhouse.parallel.registry; print('deepspeed' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
