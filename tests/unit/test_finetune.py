"""`trainer.freeze` and `trainer.optimizer.param_groups`: optimizer groups, schedule, ps shard
state, `--dry-run` and `models summary` reports, and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.launch.cli import main
from roundhouse.parallel.ps.server import ServerSetup, ShardServer
from roundhouse.trainer.optim import build_optimizer_factory, build_scheduler
from roundhouse.trainer.preflight import preflight
from roundhouse.weights.finetune import apply_freeze
from roundhouse.weights.model_build import build_model_for

GROUPS = [
    {"match": "head.*", "lr_scale": 0.1},
    {"match": "*.bias", "weight_decay": 0.0},
]


def mlp_job(**trainer: object) -> object:
    return validate_job(
        {
            "name": "ft",
            "model": {"name": "mlp", "options": {"hidden_sizes": [16, 16]}},
            "trainer": {
                "optimizer": {
                    "name": "adamw",
                    "lr": 0.1,
                    "weight_decay": 0.5,
                    "param_groups": GROUPS,
                },
                "scheduler": {"name": "cosine", "warmup_steps": 4},
                **trainer,
            },
        }
    )


def test_groups_take_the_first_matching_glob_and_the_schedule_scales_them_all() -> None:
    job = mlp_job(freeze=["fc1.*"])
    model = build_model_for(job, (1, 8, 8), 10)
    assert apply_freeze(model, job.trainer.freeze) == ["fc1.weight", "fc1.bias"]
    factory = build_optimizer_factory(job, model)
    optimizer = factory([p for p in model.parameters() if p.requires_grad])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        (sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
        for g in optimizer.param_groups
    ]
    assert groups == [
        (["fc2.weight"], 0.1, 0.5),
        (["head.bias", "head.weight"], pytest.approx(0.01), 0.5),
        (["fc2.bias"], 0.1, 0.0),
    ]
    scheduler = build_scheduler(
        optimizer, job.trainer.scheduler, steps_per_epoch=10, total_steps=20
    )
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == pytest.approx([0.1 * 3 / 5, 0.01 * 3 / 5, 0.1 * 3 / 5])  # warmup, every group


def test_frozen_tensors_get_no_gradient() -> None:
    job = mlp_job(freeze=["fc1.*"])
    model = build_model_for(job, (1, 8, 8), 10)
    apply_freeze(model, job.trainer.freeze)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is not None


def test_patterns_matching_nothing_are_errors() -> None:
    model = build_model_for(mlp_job(), (1, 8, 8), 10)
    with pytest.raises(JobFileError, match=r"trainer.freeze pattern 'backbone.\*' matches no"):
        apply_freeze(model, ["backbone.*"])
    apply_freeze(model, ["head.*"])  # the group's only parameters, now frozen
    with pytest.raises(JobFileError, match=r"param_groups\[0\].match 'head.\*' matches no"):
        build_optimizer_factory(mlp_job(), model)


def test_ps_shard_keeps_optimizer_state_per_group_across_a_restart() -> None:
    job = mlp_job()
    model = build_model_for(job, (1, 8, 8), 10)
    factory = build_optimizer_factory(job, model)
    params = [p.detach().numpy().copy() for p in model.parameters()]
    indices = [1, 4, 5]  # fc1.bias, head.weight, head.bias: groups 2, 1, 1 (0 empty here)
    setup = ServerSetup(
        "sync", 0, 1, 1, factory, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    )
    server = ShardServer()
    server.initialize(setup, indices, [params[i] for i in indices])
    assert [len(g["params"]) for g in server.optimizer.param_groups] == [0, 2, 1]
    grads = np.concatenate([np.ones(params[i].size, np.float32) for i in indices])
    server.push(0, 0, indices, grads, [True] * 3)
    saved = server.state_dict()
    restarted = ShardServer()
    restarted.initialize(setup, indices, [saved["params"][i].numpy() for i in indices], saved, 1)
    again = restarted.state_dict()
    assert again["optimizer"]["param_groups"] == saved["optimizer"]["param_groups"]
    for index in indices:
        for key, value in saved["optimizer"]["state"][index].items():
            assert torch.equal(again["optimizer"]["state"][index][key], value), (index, key)
    assert saved["optimizer"]["state"][4]["exp_avg"].shape == params[4].shape


def write_job(tmp_path: Path, extra: str = "") -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: ft\nmodel: {name: resnet, flavor: debug}\n"
        f"trainer: {{max_steps: 2, {extra}}}\nstorage: {{path: {tmp_path / 'runs'}}}\n"
    )
    return job


def test_dry_run_prints_trainable_and_frozen_counts_per_group(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = (
        "freeze: ['conv1.*', 'bn1.*', 'layer1.*'], "
        "optimizer: {param_groups: [{match: 'fc.*', lr_scale: 10}]}"
    )
    assert main(["train", str(write_job(tmp_path, extra)), "--dry-run", "--local"]) == 0
    out = capsys.readouterr().out
    # conv1 288 + bn1 64 + layer1 (two 32x32x3x3 convs, two batch-norms) 18,560
    assert "trainable 58,378, frozen 18,912 parameters" in out
    assert "group 1 'fc.*' (lr 0.01): 650" in out
    assert not (tmp_path / "runs").exists()


def test_freeze_matching_nothing_exits_2_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["train", str(write_job(tmp_path, "freeze: ['backbone.*']")), "--local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: trainer.freeze pattern 'backbone.*'") and "\n" not in err
    assert not (tmp_path / "runs").exists()


def test_models_summary_takes_job_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "models",
        "summary",
        "mlp",
        "--input",
        "100",
        "--num-classes",
        "10",
        "model.options.hidden_sizes=[1000,1000]",
        "trainer.freeze=[fc1.*]",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Total params: 1,112,010" in out  # 100*1000+1000 + 1000*1000+1000 + 1000*10+10
    assert "trainable 1,011,010, frozen 101,000 parameters" in out


@pytest.mark.parametrize(
    ("ref", "shape"),
    [
        ("gpt:124m", "1024"),
        ("bert", "16"),
        ("moe", "16"),
        ("lstm_lm", "16"),
        ("vae", "1x8x8"),
        ("ddpm", "1x8x8"),
        ("dit", "1x8x8"),
    ],
)
def test_models_summary_runs_for_language_diffusion_and_vae_models(
    ref: str, shape: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "summary", ref, "--input", shape]) == 0
    assert "trainable " in capsys.readouterr().out


def test_param_groups_with_deepspeed_pipeline_are_refused_by_its_job_check() -> None:
    job = validate_job(
        {
            "name": "groups",
            "model": {"name": "mlp"},
            "trainer": {"optimizer": {"param_groups": [{"match": "fc1.*", "lr_scale": 0.1}]}},
            "strategy": {"kind": "deepspeed", "zero_stage": 0, "pipeline_stages": 2},
            "cluster": {"num_workers": 2},
        }
    )
    with pytest.raises(JobFileError, match="pipeline or expert parallel"):
        preflight(job)
