"""DeepSpeed expert parallel (`strategy.expert_parallel: 2`) on 2 gloo ranks.

Every run goes through the real `run_worker(job, ctx)` with the `moe` model (debug flavor, 4
experts, both blocks MoE) on `builtin:pytext`: each rank holds 2 experts per layer. Checks that
it learns, logs expert counts, checkpoints every expert under the native model's names, and
that the checkpoint resumes under expert parallel, `single` and DeepSpeed on 1 rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.parallel.deepspeed.moe import (
    is_expert_name,
    merge_expert_groups,
    widen_groups,
)
from roundhouse.trainer.preflight import preflight
from tests.distributed.test_deepspeed_zero import checkpoint_copy, losses, train
from tests.distributed.test_ring_training import assert_close_weights, initial_weights, make_job
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights, read_metrics

EXPERTS = 4


def moe_job(storage: Path, run_id: str, stage: int = 1, **overrides: Any) -> dict:
    settings = {
        "model": {"name": "moe", "flavor": "debug"},
        "data": {
            "source": "builtin:pytext",
            "options": {"seq_len": 32, "max_bytes": 150000},
            "batch_size": 16,
            "eval_batch_size": 256,
            "drop_last": True,  # expert parallel needs equal micro-batches on every rank
        },
        "trainer__optimizer": {"name": "adam", "lr": 0.01},
        "trainer__scheduler": {"name": "constant", "warmup_steps": 3},
        "trainer__log_every_steps": 1,
        "trainer__max_steps": 12,
        "trainer__checkpoint": {"every_steps": 6, "every_epoch": False, "keep_last": 5},
        **overrides,
    }
    job = make_job(storage, run_id, **settings)
    job["name"] = "moe"
    job["strategy"] = {"kind": "deepspeed", "zero_stage": stage, "expert_parallel": 2}
    return job


def with_strategy(job: dict, strategy: dict) -> dict:
    return {**job, "strategy": strategy}


def last_values(run: Path) -> dict[str, float]:
    """The last logged value of every metric."""
    return {k: v for row in read_metrics(run) for k, v in row.items()}


# Capacity 4 = E: no token is ever dropped, so evaluation does not depend on how the split is
# batched across ranks and a native model scores the checkpoint exactly as the EP run did.
NO_DROPS = {"model": {"name": "moe", "flavor": "debug", "options": {"capacity_factor": 4.0}}}


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 steps of expert parallel on 2 ranks, checkpoints at steps 6 and 12."""
    return train(moe_job(tmp_path_factory.mktemp("ep"), "full", **NO_DROPS), 2)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_expert_parallel_trains_logs_counts_and_saves_every_expert(
    ep_run: Path, tmp_path: Path
) -> None:
    curve = list(losses(ep_run).values())
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.3, curve
    for row in (r for r in read_metrics(ep_run) if "train/loss" in r):
        tokens = [row[f"train/expert{i}_tokens"] for i in range(EXPERTS)]
        assert sum(tokens) == 16 * 32 * 2  # both ranks' tokens, 2 MoE layers, top-1
        assert row["train/dropped_frac"] == 0.0
    final = last_values(ep_run)
    assert sum(final[f"val/expert{i}_frac"] for i in range(EXPERTS)) == pytest.approx(1.0)
    assert final["val/aux_loss"] > 0 and final["test/loss"] < 5.0

    saved = final_weights(ep_run)
    single = with_strategy(moe_job(tmp_path, "init", **NO_DROPS), {"kind": "single"})
    native = initial_weights(single)
    assert list(saved) == list(native)  # the native names, in the native order
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in native.items()}
    assert len([k for k in saved if is_expert_name(k)]) == 2 * EXPERTS * 4  # x (fc1, fc2) x (w, b)
    for layer in (0, 1):  # every expert trained on its rank and came back under its own id
        key = f"blocks.{layer}.ffn.experts.{{}}.fc1.weight"
        start = [native[key.format(i)] for i in range(EXPERTS)]
        for i in range(EXPERTS):
            moved = [float((saved[key.format(i)] - w0).abs().max()) for w0 in start]
            assert min(range(EXPERTS), key=moved.__getitem__) == i, (layer, i, moved)
    state = torch.load(ep_run / "checkpoints" / "step_12" / "state.pt", weights_only=True)
    optimizer = state["strategy"]["optimizer"]
    trainable = [k for k in native if k != "head.proj.weight"]  # tied to embed.tok.weight
    assert sorted(optimizer["state"]) == list(range(len(trainable)))
    assert len(optimizer["param_groups"]) == 1  # DeepSpeed's dense + expert groups, merged


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_expert_parallel_resumes_at_2_ranks(ep_run: Path, tmp_path: Path) -> None:
    resumed = checkpoint_copy(ep_run, 6, tmp_path / "moe" / "resumed")
    train(moe_job(tmp_path, "resumed", **NO_DROPS), 2, resume=True)
    again, expected = losses(resumed), losses(ep_run)
    assert set(again) == set(range(7, 13))
    for step, loss in again.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), step


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_expert_parallel_checkpoint_resumes_at_1_rank(ep_run: Path, tmp_path: Path) -> None:
    native = checkpoint_copy(ep_run, 12, tmp_path / "moe" / "scored")
    train(with_strategy(moe_job(tmp_path, "scored", **NO_DROPS), {"kind": "single"}), 1, True)
    assert last_values(native)["val/loss"] == pytest.approx(
        last_values(ep_run)["val/loss"], abs=1e-4
    )
    more = {**NO_DROPS, "trainer__max_steps": 14}
    curves = {}
    for name, strategy in {
        "single": {"kind": "single"},
        "ds1": {"kind": "deepspeed", "zero_stage": 1},
    }.items():
        run = checkpoint_copy(ep_run, 12, tmp_path / "moe" / name)
        train(with_strategy(moe_job(tmp_path, name, **more), strategy), 1, resume=True)
        curves[name] = losses(run)
    assert set(curves["single"]) == {13, 14}
    for step in (13, 14):  # the same weights and Adam state reached both 1-rank strategies
        assert curves["ds1"][step] == pytest.approx(curves["single"][step], abs=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": {"zero_stage": 3}}, "does not run under ZeRO-3"),
        ({"data": {"drop_last": False}}, "set data.drop_last=true"),
    ],
)
def test_expert_parallel_job_checks(tmp_path: Path, change: dict, message: str) -> None:
    job = moe_job(tmp_path, "check")
    job["cluster"] = {"num_workers": 2}
    for section, values in change.items():
        job[section] = {**job[section], **values}
    with pytest.raises(JobFileError, match=message):
        preflight(validate_job(job))


def test_expert_names_and_merged_groups() -> None:
    assert is_expert_name("blocks.0.ffn.experts.3.fc1.weight")
    assert not is_expert_name("blocks.0.ffn.router.proj.weight")
    assert not is_expert_name("blocks.0.ffn.moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.b")
    layout = {
        "state": {},
        "param_groups": [
            {"lr": 0.1, "name": "dense", "params": [0, 3]},
            {"lr": 0.1, "name": "ep_size_2", "moe": True, "params": [1, 2]},
        ],
    }
    scheduler = {"base_lrs": [0.1, 0.1], "last_epoch": 3}
    optimizer, merged = merge_expert_groups(layout, scheduler)
    assert optimizer["param_groups"] == [{"lr": 0.1, "params": [0, 1, 2, 3]}]
    assert merged == {"base_lrs": [0.1], "last_epoch": 3}
    assert widen_groups(optimizer["param_groups"], merged, 2)[1] == scheduler
    layout["param_groups"][1]["lr"] = 0.2  # different hyperparameters stay apart
    assert merge_expert_groups(layout, scheduler) == (layout, scheduler)


def layer_parity(rank: int, world_size: int, top_k: int, capacity: float) -> dict[str, float]:
    """On one rank (ep_size 1): the DeepSpeed layer against the native layer it replaced."""
    from roundhouse.models.moe import MoELayer
    from roundhouse.parallel.deepspeed.moe import apply_deepspeed_moe
    from roundhouse.parallel.deepspeed.strategy import init_deepspeed_dist
    from tests.distributed.test_ring_training import node_context

    init_deepspeed_dist(node_context(rank, world_size, world_size))
    torch.manual_seed(0)
    native = MoELayer(16, 32, num_experts=4, top_k=top_k, capacity_factor=capacity)
    model = torch.nn.ModuleDict({"ffn": native})
    reference = MoELayer(16, 32, num_experts=4, top_k=top_k, capacity_factor=capacity)
    reference.load_state_dict(native.state_dict())
    hook = apply_deepspeed_moe(model, 1)
    x = torch.randn(2, 24, 16)
    out, expected = model["ffn"](x), reference(x)
    layer = model["ffn"]
    weights, _ = hook.consolidate(dict(model.named_parameters()), {})
    assert set(weights) == {f"ffn.{k}" for k in reference.state_dict()}
    model.eval()  # the eval replica: the native computation on the same weights
    with torch.no_grad():
        replica_error = float((model["ffn"](x) - expected).abs().max())
    return {
        "output": float((out - expected).abs().max()),
        "aux_loss": float((layer.aux_loss - reference.aux_loss).abs()),
        "counts": float((layer.expert_counts - reference.expert_counts).abs().max()),
        "dropped": float(layer.dropped_tokens - reference.dropped_tokens),
        "native_dropped": float(reference.dropped_tokens),
        "replica": replica_error,
    }


@pytest.mark.parametrize("top_k", [1, 2])
def test_deepspeed_layer_matches_native_layer(top_k: int) -> None:
    roomy = run_distributed(layer_parity, 1, 120, top_k, 4.0)[0]  # no token dropped
    assert roomy["native_dropped"] == 0
    assert roomy["output"] < 1e-5 and roomy["aux_loss"] < 1e-6 and roomy["counts"] == 0
    assert roomy["replica"] < 1e-6
    tight = run_distributed(layer_parity, 1, 120, top_k, 0.5)[0]  # half the tokens dropped
    assert tight["native_dropped"] > 0 and tight["dropped"] == 0 and tight["counts"] == 0
    assert tight["aux_loss"] < 1e-6 and tight["replica"] < 1e-6


@pytest.mark.timeout(300)
def test_native_moe_under_zero2_equals_single(tmp_path: Path) -> None:
    """The zoo's MoE layer under plain ZeRO-2 (no expert parallel): every rank must hand
    DeepSpeed the same set of gradients, so an expert that got no token on a rank still runs
    (a zero gradient); gloo failed on the mismatched buckets before. No balance loss (a
    per-rank balance is not the global batch's) and no drops, so the ranks add up to one
    device on the global batch."""
    options = {"capacity_factor": 4.0, "balance_coef": 0.0}
    model = {"name": "moe", "flavor": "debug", "options": options}
    settings = {"model": model, "trainer__max_steps": 6, "trainer__checkpoint": {"every_steps": 6}}
    single = train(with_strategy(moe_job(tmp_path, "single", **settings), {"kind": "single"}), 1)
    zero2 = moe_job(tmp_path, "zero2", **settings)
    run = train(with_strategy(zero2, {"kind": "deepspeed", "zero_stage": 2}), 2)
    expected = final_weights(single)
    initial = initial_weights(
        with_strategy(moe_job(tmp_path, "init", **settings), {"kind": "single"})
    )
    assert max(float((expected[k] - initial[k]).abs().max()) for k in expected) > 1e-2
    assert_close_weights(final_weights(run), expected)
