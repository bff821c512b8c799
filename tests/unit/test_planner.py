"""`roundhouse plan`: its formulas, the meta-device trace, `strategy.kind: auto`, bad input.

Plans here target a table accelerator (H100-80GB) with a given bandwidth, so nothing is
calibrated; the calibrated CPU path is exercised by benchmarks/plan_accuracy.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from roundhouse.calibration import exchange as exchangecal
from roundhouse.calibration.cache import cache_path, cached, remeasured
from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.launch.auto import resolve_auto
from roundhouse.launch.cli import main
from roundhouse.parallel.costs import (
    Candidate,
    JobShape,
    LayerProfile,
    LinkRate,
    Memory,
    ModelProfile,
    StepRate,
    Target,
    optimizer_moments,
)
from roundhouse.parallel.deepspeed.partition import busiest_stage_share, pipeline_step_share
from roundhouse.parallel.deepspeed.zero_memory import zero_states
from roundhouse.planner import build_plan
from roundhouse.planner.candidates import candidate
from roundhouse.planner.costs import comm_time, evaluate
from roundhouse.planner.devices import get_accelerator, parse_bandwidth
from roundhouse.planner.target import JobModel, job_profile

GB = 1e9


def job_dict(model: dict | None = None, strategy: dict | None = None, **sections) -> dict:
    data = {
        "name": "plan",
        "model": model or {"name": "mlp"},
        "data": {"source": "builtin:digits", "batch_size": 64},
        "trainer": {"max_steps": 2, "optimizer": {"name": "adam"}},
        "strategy": strategy or {"kind": "ring"},
        "cluster": {"num_workers": 4},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
    }
    data.update(sections)
    return data


def profile(num_params: int = 1_000_000) -> ModelProfile:
    return ModelProfile(num_params, num_params // 10, 0.0, 1e6, 1e5, 1e4)


def target(bandwidth: float = 1e9, latency: float = 0.0, overlap: bool = False) -> Target:
    step = StepRate(0.0, 1e-3, 1e-3)
    return Target("test", 80 * GB, lambda: step, LinkRate(latency, bandwidth), overlap=overlap)


SHAPE = JobShape(
    global_batch=64, grad_accum_steps=1, optimizer_moments=2, settings={"bucket_mb": 1e6}
)


def row_of(label: str, workers: int, strategy: dict, shape: JobShape = SHAPE) -> Candidate:
    """The candidate for `strategy` on `workers` workers at `shape`'s batch."""
    return candidate(label, workers, strategy, shape)


@pytest.mark.parametrize("workers", [2, 4, 8])
def test_ring_moves_2_n_minus_1_over_n_of_the_gradients(workers: int) -> None:
    p = profile()
    ring = row_of("ring", workers, {"kind": "ring"})
    seconds = sum(comm_time(ring, p, target(bandwidth=1e9), SHAPE))
    assert seconds == pytest.approx(2 * (workers - 1) / workers * 4 * p.num_params / 1e9)


def test_a_live_ring_keeps_a_copy_of_its_gradients() -> None:
    """`cluster.recovery: live` keeps each step's own fp32 gradients until it is applied."""
    p, t = profile(), target()
    live = JobShape(64, 1, 2, settings={"bucket_mb": 1e6}, live_recovery=True)
    ring = row_of("ring", 2, {"kind": "ring"})
    plain, kept = (ring.costs.memory(ring, p, t, shape).buffers for shape in (SHAPE, live))
    assert kept - plain == 4 * p.num_params


def test_zero3_moves_one_and_a_half_times_a_ring_and_ps_scales_with_workers() -> None:
    p, t = profile(), target()
    ring = sum(comm_time(row_of("ring", 4, {"kind": "ring"}), p, t, SHAPE))
    z3 = row_of("z3", 4, {"kind": "deepspeed", "zero_stage": 3})
    zero3 = sum(comm_time(z3, p, t, SHAPE))
    assert zero3 == pytest.approx(1.5 * ring)
    ps2 = sum(comm_time(row_of("ps", 2, {"kind": "ps"}), p, t, SHAPE))
    ps8 = sum(comm_time(row_of("ps", 8, {"kind": "ps"}), p, t, SHAPE))
    assert ps8 == pytest.approx(4 * ps2)  # the server's link carries every worker


def test_overlap_hides_exchange_under_the_backward_pass_on_gpus() -> None:
    p, ring = profile(), row_of("ring", 8, {"kind": "ring"})
    exposed = evaluate(ring, p, target(bandwidth=1e12, overlap=True), SHAPE).comm_s
    assert exposed == 0.0
    assert evaluate(ring, p, target(bandwidth=1e12), SHAPE).comm_s > 0


def test_step_rate_from_the_loop_calibration_splits_overhead_and_engine_costs() -> None:
    figures = {
        "small/fwd_bwd_s": 0.3,
        "large/fwd_bwd_s": 0.5,
        "small/optimizer_s": 0.04,
        "large/optimizer_s": 0.06,
        "small/loop_s": 0.001,
        "large/loop_s": 0.003,
        "zero2/fwd_bwd_s": 0.35,
        "zero2/optimizer_s": 0.1,
        "zero3/fwd_bwd_s": 0.42,
        "zero3/optimizer_s": 0.12,
    }
    rate = StepRate.from_loop(figures, (4, 8))
    assert rate.per_sample_s == pytest.approx(0.05)
    assert rate.overhead_s == pytest.approx(0.1)
    assert rate.optimizer_s == pytest.approx(0.05)
    # the loop's work: 0.5 ms per sample (loading grows with the batch), nothing fixed
    assert (rate.loop_s, rate.loop_per_sample_s) == (0.0, pytest.approx(0.0005))
    assert rate.loop(16) == pytest.approx(0.008)
    assert rate.engine_fwd_bwd_s == {"zero2": pytest.approx(0.05), "zero3": pytest.approx(0.12)}
    assert rate.engine_optimizer_s == {"zero2": 0.1, "zero3": 0.12}


def test_zero_rows_add_the_engines_costs_and_step_their_partition() -> None:
    engines = {"zero2": 0.01, "zero3": 0.05}, {"zero2": 0.08, "zero3": 0.12}
    rate = StepRate(0.0, 1e-3, 0.04, 0.002, *engines)
    t = Target("test", 80 * GB, lambda: rate, LinkRate(0.0, 1e12))
    p, micro = profile(), SHAPE.global_batch / 4
    base = rate.fwd_bwd(micro) + rate.loop_s
    ring = evaluate(row_of("ring", 4, {"kind": "ring"}), p, t, SHAPE)
    assert ring.compute_s == pytest.approx(base + 0.04)
    z2 = evaluate(row_of("z2", 4, {"kind": "deepspeed", "zero_stage": 2}), p, t, SHAPE)
    assert z2.compute_s == pytest.approx(base + 0.01 + 0.08 / 4)
    z3 = evaluate(row_of("z3", 4, {"kind": "deepspeed", "zero_stage": 3}), p, t, SHAPE)
    assert z3.compute_s == pytest.approx(base + 0.05 + 0.12 / 4)


def test_probed_residuals_are_added_per_family_and_scaled_to_the_row() -> None:
    fitted = {
        "ring/fixed": 0.01,
        "ring/per_module": 0.001,
        "ps/fixed": 0.004,
        "ps/per_param": 1e-4,
        "zero3/per_module": 0.002,
        "pipeline/fixed": 0.003,
    }
    rate, link = StepRate(0.0, 1e-3, 1e-3), LinkRate(0.0, 1e12)
    bare = Target("test", 80 * GB, lambda: rate, link)
    probed = Target("test", 80 * GB, lambda: rate, link, residuals=lambda: fitted)
    layers = [LayerProfile(10, 1.0, 1.0, 1.0) for _ in range(4)]
    p = ModelProfile(40, 10, 0.0, 4.0, 4.0, 1.0, layers=layers, param_modules=20)

    def extra(workers: int, strategy: dict, shape: JobShape = SHAPE) -> float:
        c = row_of("row", workers, strategy, shape)
        return evaluate(c, p, probed, shape).comm_s - evaluate(c, p, bare, shape).comm_s

    assert extra(1, {"kind": "single"}) == 0.0
    assert extra(2, {"kind": "ring"}) == pytest.approx(0.01 + 20 * 0.001)
    assert extra(4, {"kind": "ring"}) == pytest.approx(3 * (0.01 + 20 * 0.001))  # N - 1 steps
    assert extra(8, {"kind": "ps"}) == pytest.approx(4 * (0.004 + 40 * 1e-4))  # N / 2 pushers
    two_servers = {"kind": "ps", "num_servers": 2}
    shape2 = JobShape(64, 1, 2, settings={"bucket_mb": 1e6, "num_servers": 2})
    assert extra(2, two_servers, shape2) == pytest.approx(0.004 + 20 * 1e-4)
    assert extra(2, {"kind": "deepspeed", "zero_stage": 3}) == pytest.approx(20 * 0.002)
    assert extra(2, {"kind": "deepspeed", "zero_stage": 2}) == 0.0  # "zero" was not fitted
    pipe = {"kind": "deepspeed", "zero_stage": 1, "pipeline_stages": 2}
    accum4 = JobShape(64, 4, 2, settings={"bucket_mb": 1e6})
    assert extra(2, pipe, accum4) == pytest.approx(0.003 * (4 + 1) / 2)  # per micro-batch slot


def test_a_calibration_nested_in_another_keeps_both_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROUNDHOUSE_CACHE_DIR", str(tmp_path))

    def outer() -> dict[str, float]:
        return {"y": cached("inner", lambda: {"x": 1.0})["x"] + 1}

    assert cached("outer", outer) == {"y": 2.0}
    table = json.loads(cache_path().read_text())
    assert sorted(key.split("/", 1)[1] for key in table) == ["inner", "outer"]


def test_recalibrating_measures_each_entry_read_once_more(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROUNDHOUSE_CACHE_DIR", str(tmp_path))
    calls: list[str] = []

    def measure(key: str) -> Callable[[], dict[str, float]]:
        return lambda: calls.append(key) or {"run": float(len(calls))}

    assert cached("link", measure("link")) == {"run": 1.0}
    assert cached("other", measure("other")) == {"run": 2.0}
    assert cached("link", measure("link")) == {"run": 1.0}  # read back, not measured
    with remeasured():
        assert cached("link", measure("link")) == {"run": 3.0}
        assert cached("link", measure("link")) == {"run": 3.0}  # once per block
    assert cached("link", measure("link")) == {"run": 3.0}  # the new figure is stored
    assert cached("other", measure("other")) == {"run": 2.0}  # entries not read stay
    assert calls == ["link", "other", "link"]


def test_a_failed_exchange_probe_plans_without_residuals(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROUNDHOUSE_CACHE_DIR", str(tmp_path))

    def broken(threads: int, plan_probe) -> dict[str, float]:
        raise RuntimeError("exchange calibration failed: no loopback port")

    monkeypatch.setattr(exchangecal, "measure_residuals", broken)
    assert exchangecal.local_residuals(1, build_plan) == {}
    assert not cache_path().exists()  # nothing cached: the next plan probes again


def test_the_jobs_own_probed_step_replaces_the_mlp_fit_and_never_lowers_a_row() -> None:
    fitted = {"ring/fixed": 1.0, "ring/per_module": 1.0, "ring/step": 0.004, "ps/step": -0.01}
    rate, link = StepRate(0.0, 1e-3, 1e-3), LinkRate(0.0, 1e12)
    bare = Target("test", 80 * GB, lambda: rate, link)
    probed = Target("test", 80 * GB, lambda: rate, link, residuals=lambda: fitted)
    p = profile()

    def extra(workers: int, strategy: dict) -> float:
        c = row_of("row", workers, strategy)
        return evaluate(c, p, probed, SHAPE).comm_s - evaluate(c, p, bare, SHAPE).comm_s

    assert extra(2, {"kind": "ring"}) == pytest.approx(0.004)  # not 1.0 + modules x 1.0
    assert extra(4, {"kind": "ring"}) == pytest.approx(3 * 0.004)
    assert extra(4, {"kind": "ps"}) == 0.0  # over-priced at the probe: nothing taken off


class FakePlan:
    """What `job_probe` reads of a plan: its rows' labels and step times."""

    def __init__(self, steps: dict[str, float]) -> None:
        row = type("Row", (), {})
        self.rows = []
        for label, step_s in steps.items():
            r = row()
            r.candidate, r.step_s = type("Candidate", (), {"label": label})(), step_s
            self.rows.append(r)


def test_the_job_is_its_own_exchange_probe_when_its_steps_are_cheap() -> None:
    job = validate_job(
        job_dict(strategy={"kind": "ps", "num_servers": 2}, trainer={"grad_accum_steps": 2})
    )
    asked = []

    def plan_probe(spec, workers: int) -> FakePlan:
        asked.append((spec.data.batch_size, spec.trainer.grad_accum_steps, workers))
        return FakePlan({"single": 0.01, "ring": 0.02, "ps": 0.03, "zero2": 0.02, "zero3": 0.05})

    probe, predicted = exchangecal.job_probe(job, plan_probe)
    assert asked == [(32, 1, 2)]  # one step of the job: 64 samples in 2 micro-batches
    assert predicted == {"ring": 0.02, "ps": 0.03, "zero": 0.02, "zero3": 0.05}  # no pipeline2
    # cheap steps: the most steps and builds (a millisecond step's median is noisy)
    assert probe.batch == 32 and probe.steps == exchangecal.JOB_MAX_STEPS
    assert probe.rounds == exchangecal.JOB_ROUNDS

    def dearer(spec, workers: int) -> FakePlan:  # 7 builds of 40 steps would not fit
        return FakePlan({"ring": 0.1, "zero3": 0.1})

    dear, _ = exchangecal.job_probe(job, dearer)
    assert dear.rounds == exchangecal.ROUNDS
    assert dear.steps == min(exchangecal.JOB_MAX_STEPS, int(40.0 / (3 * 0.2)) - 2)
    assert probe.strategies["ps"] == {"kind": "ps", "mode": "sync", "num_servers": 2}
    assert probe.strategies["ring"]["bucket_mb"] == 25.0

    def slow(spec, workers: int) -> FakePlan:
        return FakePlan({"ring": 10.0, "zero3": 10.0})

    with pytest.raises(ValueError, match="would take over"):
        exchangecal.job_probe(job, slow)
    with pytest.raises(ValueError, match="cannot be split"):
        exchangecal.job_probe(
            validate_job(job_dict(data={"source": "builtin:digits", "batch_size": 1})), plan_probe
        )


def test_a_failed_job_probe_falls_back_and_caches_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ROUNDHOUSE_CACHE_DIR", str(tmp_path))

    def broken(threads: int, probes) -> dict[str, float]:
        raise RuntimeError("exchange calibration failed: rank 1 exited")

    monkeypatch.setattr(exchangecal, "measure_families", broken)
    job = validate_job(job_dict())
    assert exchangecal.job_residuals(job, 1, lambda spec, n: FakePlan({"ring": 0.01})) == {}
    assert not cache_path().exists()


def test_a_pipeline_stage_runs_its_share_of_the_flops_as_deepspeed_splits_by_parameters() -> None:
    layers = [LayerProfile(10, 1.0, 1.0, flops) for flops in (3.0, 1.0, 1.0, 1.0)]
    p = ModelProfile(40, 10, 0.0, 6.0, 4.0, 1.0, layers=layers)
    assert busiest_stage_share(p, 2) == pytest.approx(4 / 6)  # layers 0-1 | 2-3
    even = [LayerProfile(10, 1.0, 1.0, 2.0) for _ in range(4)]
    assert busiest_stage_share(ModelProfile(40, 10, 0.0, 8.0, 4.0, 1.0, layers=even), 4) == 0.25


def test_a_pipeline_step_is_the_whole_model_once_then_its_busiest_stage_per_micro_batch() -> None:
    even = ModelProfile(40, 10, 0.0, 8.0, 4.0, 1.0, layers=[LayerProfile(10, 1.0, 1.0, 2.0)] * 4)
    for stages, micro in ((2, 1), (2, 8), (4, 4)):  # balanced: GPipe's (m + s - 1) / s
        assert pipeline_step_share(even, stages, micro) == pytest.approx(
            (micro + stages - 1) / stages
        )
    # an LSTM LM: embedding | recurrence (one layer, nearly all the FLOPs) | head
    lstm = [
        LayerProfile(16, 1.0, 1.0, 0.1),
        LayerProfile(850, 1.0, 1.0, 9.3),
        LayerProfile(66, 1.0, 1.0, 0.6),
    ]
    p = ModelProfile(932, 850, 0.0, 10.0, 3.0, 1.0, layers=lstm)
    assert busiest_stage_share(p, 2) == pytest.approx(0.94)
    assert pipeline_step_share(p, 2, 1) == 1.0  # one micro-batch: the stages take turns
    assert pipeline_step_share(p, 2, 4) == pytest.approx(1 + 3 * 0.94)
    shape = JobShape(global_batch=16, grad_accum_steps=1, optimizer_moments=2)
    pipe = candidate("pipeline2", 2, {"kind": "deepspeed", "pipeline_stages": 2}, shape)
    step = StepRate(0.0, 0.01, 0.0)
    t = Target("cpu", 1e12, lambda: step, LinkRate(0.0, 1e12), overlap=False)
    assert pipe.costs.compute_s(pipe, p, t, shape) == pytest.approx(step.fwd_bwd(16))


def test_freed_gradients_count_with_the_optimizer_step_not_with_the_activations() -> None:
    kept = Memory(params=1, grads=1, optimizer=2, activations=5, buffers=0, scratch=0.5)
    assert kept.total == 9
    freed = Memory(1, 1, 2, 5, 0, scratch=0.5, grads_freed=True)
    assert freed.total == 8  # the backward pass starts with no gradients
    assert Memory(1, 4, 2, 3, 0, scratch=0.5, grads_freed=True).total == 7.5
    assert "grads_freed" not in freed.as_dict()


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_zero_model_states_equal_deepspeeds_estimators(gpus: int) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, largest = 1_300_000_000, 50_000_000
    common = {"dp": gpus, "moments": 2, "bf16": True}
    for offload in (False, True):
        _, ds = estimate_zero2_model_states_mem_needs(params, gpus, 1, cpu_offload=offload)
        ours = zero_states(params, largest, stage=2, offload_optimizer=offload, **common)
        assert sum(ours[:3]) == pytest.approx(ds, rel=0.01)
    for offload, offload_params in ((False, False), (True, False), (True, True)):
        _, ds, _ = estimate_zero3_model_states_mem_needs(
            params, largest, gpus, 1, cpu_offload=offload, cpu_offload_params=offload_params
        )
        ours = zero_states(
            params,
            largest,
            stage=3,
            offload_optimizer=offload,
            offload_params=offload_params,
            **common,
        )
        assert sum(ours[:3]) == pytest.approx(ds, rel=0.01)


def test_a_1_3b_model_is_traced_on_the_meta_device_without_allocating() -> None:
    job = validate_job(
        job_dict(
            {"name": "gpt", "flavor": "1.3b"},
            data={
                "source": "builtin:pytext",
                "batch_size": 8,
                "options": {"seq_len": 64, "max_bytes": 100000},
            },
        )
    )
    before = psutil.Process().memory_info().rss
    p = job_profile(JobModel(job))
    grown = psutil.Process().memory_info().rss - before
    assert 1.2e9 < p.num_params < 1.25e9  # 4.8 GB of fp32 weights had they been allocated
    assert grown < 0.5e9
    # forward FLOPs per sample: about 2 x params x tokens (the GPT formula), plus attention
    assert p.fwd_flops == pytest.approx(2 * p.num_params * 64, rel=0.1)
    assert p.saved_bytes > 0 and p.tp_param_fraction > 0.9 and p.num_heads == 16
    assert len(p.layers) == 26 and p.tied_across_layers  # embed, 24 blocks, head; tied


def plan_job(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "job.yaml"
    data = job_dict({"name": "gpt", "flavor": "debug"}, **changes)
    data["data"] = {
        "source": "builtin:pytext",
        "batch_size": 16,
        "options": {"seq_len": 32, "max_bytes": 50000},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_plan_json_ranks_rows_and_recommends_one(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "plan",
            str(plan_job(tmp_path)),
            "--device",
            "H100-80GB",
            "--workers",
            "1,2,4",
            "--bandwidth",
            "25GB/s",
            "--json",
        ]
    )
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    labels = {(r["label"], r["workers"]) for r in plan["rows"]}
    assert {("single", 1), ("ring", 2), ("ps", 4), ("zero3", 4), ("tp4", 4)} <= labels
    assert ("pipeline2", 2) not in labels  # gpt ties its embedding to its head
    # the job asks for 4 workers: its rows rank first, each group fastest first
    own = [r["samples_per_s"] for r in plan["rows"] if r["fits"] and r["workers"] == 4]
    rest = [r["samples_per_s"] for r in plan["rows"] if r["fits"] and r["workers"] != 4]
    fitting = [r["samples_per_s"] for r in plan["rows"] if r["fits"]]
    assert fitting == sorted(own, reverse=True) + sorted(rest, reverse=True)
    assert plan["recommended"] == plan["rows"][0] and plan["recommended"]["workers"] == 4
    # this tiny model runs fastest on one GPU, and the reason says so
    assert max(rest) > max(own)
    assert "would be" in plan["reason"] and "cluster.num_workers=" in plan["reason"]
    assert plan["link"]["bytes_per_s"] == 25e9


def test_without_the_jobs_worker_count_the_fastest_row_of_any_count_is_recommended(
    tmp_path: Path, capsys
) -> None:
    argv = ["plan", str(plan_job(tmp_path)), "--device", "H100-80GB", "--workers", "1,2"]
    assert main([*argv, "--bandwidth", "25GB/s", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    speeds = [r["samples_per_s"] for r in plan["rows"] if r["fits"]]
    assert speeds == sorted(speeds, reverse=True)
    assert plan["recommended"] == plan["rows"][0] and "would be" not in plan["reason"]


def test_a_job_nothing_fits_prints_the_table_and_what_would_fit(tmp_path: Path, capsys) -> None:
    path = tmp_path / "big.yaml"
    data = job_dict({"name": "gpt", "flavor": "124m"})
    data["data"] = {
        "source": "builtin:pytext",
        "batch_size": 8192,
        "options": {"seq_len": 128, "max_bytes": 50000},
    }
    path.write_text(yaml.safe_dump(data))
    code = main(["plan", str(path), "--device", "L4", "--workers", "1"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "single" in out and "NO" in out
    assert err.startswith("error: nothing fits 24 GB") and ("workers" in err or "accum" in err)


def test_unknown_device_lists_the_known_ones(tmp_path: Path, capsys) -> None:
    assert main(["plan", str(plan_job(tmp_path)), "--device", "H1000"]) == 2
    err = capsys.readouterr().err
    assert "unknown --device 'H1000'" in err and "H100-80GB" in err and "L4" in err
    with pytest.raises(JobFileError, match="known devices"):
        get_accelerator("TPUv9")


def test_bandwidth_units() -> None:
    assert parse_bandwidth("25GB/s") == 25e9
    assert parse_bandwidth("100Gb/s") == 12.5e9
    with pytest.raises(JobFileError, match="bandwidth"):
        parse_bandwidth("fast")


def test_rows_are_the_strategies_whose_own_checks_accept_the_job() -> None:
    def labels(**trainer) -> set[str]:
        job = validate_job(job_dict(trainer={"max_steps": 2, **trainer}))
        return {r.candidate.label for r in build_plan(job, [2], "H100-80GB", 25e9).rows}

    assert {"ps", "ring", "zero3"} <= labels()
    clipped = labels(grad_clip_norm=1.0)  # ps servers never see the whole gradient's norm
    assert "ps" not in clipped and {"ring", "zero3"} <= clipped


AUTO = {"kind": "auto", "device": "H100-80GB", "bandwidth": "25GB/s"}


def test_auto_resolves_to_the_plans_choice_before_launch() -> None:
    job = validate_job(job_dict(strategy=AUTO))
    resolved, by_size = resolve_auto(job, local=False)
    plan = build_plan(job, [4], "H100-80GB", 25e9)
    expected = validate_job(job_dict(strategy=plan.best.candidate.strategy)).strategy
    assert resolved.strategy == expected
    assert by_size == {4: plan.best.candidate.strategy}


def test_auto_with_candidates_and_an_elastic_group_plans_each_size() -> None:
    job = validate_job(
        job_dict(
            strategy={**AUTO, "candidates": ["ring"]}, cluster={"num_workers": 4, "min_workers": 2}
        )
    )
    resolved, by_size = resolve_auto(job, local=False)
    assert resolved.strategy.kind == "ring"
    assert sorted(by_size) == [2, 3, 4] and all(s["kind"] == "ring" for s in by_size.values())
    job = validate_job(
        job_dict(
            strategy={**AUTO, "candidates": ["ps", "ring", "deepspeed"]},
            cluster={"num_workers": 4, "min_workers": 1},
        )
    )
    _, by_size = resolve_auto(job, local=False)
    assert sorted(by_size) == [1, 2, 3, 4]
    if by_size[4]["kind"] != "ps":  # a shrunken group cannot start parameter servers
        assert all(s["kind"] != "ps" for s in by_size.values())
    unchanged, empty = resolve_auto(validate_job(job_dict()), local=False)
    assert unchanged.strategy.kind == "ring" and empty == {}


def test_auto_that_nothing_fits_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    path = tmp_path / "auto.yaml"
    data = job_dict(
        {"name": "gpt", "flavor": "124m"},
        strategy={**AUTO, "device": "L4"},
        cluster={"num_workers": 1},
    )
    data["data"] = {
        "source": "builtin:pytext",
        "batch_size": 8192,
        "options": {"seq_len": 128, "max_bytes": 50000},
    }
    path.write_text(yaml.safe_dump(data))
    assert main(["train", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: strategy.kind=auto: nothing fits 24 GB")


def test_plan_json_is_the_only_thing_on_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """What a calibration writes to stdout goes to stderr under --json: a DeepSpeed JIT op
    build writes from C and from ninja (a child process), and Python code prints. The stand-in
    calibration below writes all three ways, then the real planner runs."""
    import subprocess

    import roundhouse.planner as planner

    real_build_plan = planner.build_plan

    def noisy_build_plan(*args, **kwargs):
        print("Loading extension module cpu_adam...")
        os.write(1, b"Time to load cpu_adam op: 0.1 seconds\n")
        subprocess.run(["echo", "[1/3] c++ cpu_adam.o op built successfully"], check=True)
        return real_build_plan(*args, **kwargs)

    monkeypatch.setattr(planner, "build_plan", noisy_build_plan)
    argv = [
        "plan",
        str(Path(__file__).parents[2] / "configs" / "quickstart.yaml"),
        "--device",
        "H100-80GB",
    ]
    assert main([*argv, "--workers", "1,2", "--json", "tracking.wandb.mode=disabled"]) == 0
    captured = capfd.readouterr()
    plan = json.loads(captured.out)  # nothing but the JSON
    assert plan["rows"] and plan["recommended"]
    assert "op built successfully" in captured.err and "cpu_adam op" in captured.err
    assert "Loading extension module" in captured.err


@pytest.mark.parametrize("name", ["sgd", "rmsprop", "adagrad", "adam", "adamw"])
def test_optimizer_moments_count_the_tensors_the_built_optimizer_keeps(name: str) -> None:
    """The memory model's per-parameter state tensors equal what the job's optimizer holds."""
    import torch

    from roundhouse.trainer.optim import build_optimizer

    job = validate_job(job_dict(trainer={"max_steps": 2, "optimizer": {"name": name}}))
    weight = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = build_optimizer([weight], job.trainer.optimizer)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    kept = [v for v in optimizer.state[weight].values() if v.shape == weight.shape]
    opt = job.trainer.optimizer
    assert optimizer_moments(opt.name, opt.momentum) == len(kept)
