"""A strategy package owns everything about itself: a new one is one package (its torch-free
section, its Strategy and cost model: tests/helpers/solo) plus one registry line, and it
trains, dry-runs, shows in `plan` and can be chosen by `strategy.kind: auto`; the planner and
the calibration room name no strategy; each strategy prices its own rows."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roundhouse.config import JobSpec
from roundhouse.config.loading import load_job, validate_job
from roundhouse.config.topology import Topology
from roundhouse.data.sampler import BatchPlan
from roundhouse.errors import JobFileError
from roundhouse.launch.auto import resolve_auto
from roundhouse.launch.cli import main
from roundhouse.launch.local import train_local
from roundhouse.parallel import registry
from roundhouse.parallel.context import build_local_context
from roundhouse.parallel.costs import (
    JobShape,
    LinkRate,
    ModelProfile,
    StepRate,
    Target,
)
from roundhouse.planner.candidates import candidate, enumerate_candidates
from tests.helpers.runs import only_run, read_metrics
from tests.helpers.solo.section import SoloStrategyConfig
from tests.helpers.solo.strategy import SoloStrategy

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
PURE_ROOMS = [ROOT / "roundhouse" / "planner", ROOT / "roundhouse" / "calibration"]
BUILT_IN_KINDS = {"single", "ring", "ps", "deepspeed"}
H100 = ["--device", "H100-80GB", "--bandwidth", "25GB/s"]

# --- a new strategy: tests/helpers/solo is its package; `registry.STRATEGIES["solo"]` its line --


@pytest.fixture
def solo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.STRATEGIES, "solo", SoloStrategy)  # the one registry line


def overrides(tmp_path: Path, kind: str) -> list[str]:
    return [
        f"strategy.kind={kind}",
        "trainer.max_epochs=null",
        "trainer.max_steps=2",
        "trainer.log_every_steps=1",
        "cluster.num_workers=1",
        "tracking.wandb.mode=disabled",
        "tracking.console=off",
        f"storage.path={tmp_path / 'runs'}",
    ]


def test_a_new_strategy_brings_its_own_section_without_torch() -> None:
    """Its torch-free section module alone teaches the job schema the new kind."""
    code = (
        "import sys\n"
        "import tests.helpers.solo.section\n"
        "from roundhouse.config.loading import load_job\n"
        f"job = load_job({str(QUICKSTART)!r}, ['strategy.kind=solo'])\n"
        "print(type(job.strategy).__name__, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["SoloStrategyConfig", "False"]


def test_a_new_strategy_dry_runs(solo: None, tmp_path: Path, capsys) -> None:
    args = ["train", str(QUICKSTART), *overrides(tmp_path, "solo"), "--local", "--dry-run"]
    assert main(args) == 0
    assert "solo" in capsys.readouterr().out


def test_a_new_strategy_shows_in_plan(solo: None, tmp_path: Path, capsys) -> None:
    args = ["plan", str(QUICKSTART), *overrides(tmp_path, "solo"), *H100, "--workers", "1,2"]
    assert main([*args, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    solo_rows = [(r["label"], r["workers"], r["strategy"]) for r in rows if r["label"] == "solo"]
    assert solo_rows == [("solo", 1, {"kind": "solo"})]  # one device: on one worker only
    by_label = {(r["label"], r["workers"]): r for r in rows}
    assert by_label[("solo", 1)]["compute_s"] == pytest.approx(
        by_label[("single", 1)]["compute_s"] / 2
    )  # its own cost model priced it


def test_auto_chooses_the_new_strategy_and_it_trains(solo: None, tmp_path: Path) -> None:
    job = load_job(QUICKSTART, overrides(tmp_path, "auto"))
    job = validate_job(
        {**job.model_dump(mode="json"), "strategy": {"kind": "auto", "device": "H100-80GB"}}
    )
    resolved, by_size = resolve_auto(job, local=True)
    assert isinstance(resolved.strategy, SoloStrategyConfig)  # fastest by its own prices
    assert by_size == {1: {"kind": "solo"}}
    summary = train_local(resolved)
    metrics = read_metrics(only_run(tmp_path / "runs", "quickstart"))
    assert [r["train/solo_steps"] for r in metrics if "train/solo_steps" in r] == [1.0, 2.0]
    assert summary["train/steps"] == 2.0


def test_auto_candidates_take_any_registered_kind_and_refuse_others(
    solo: None, tmp_path: Path
) -> None:
    job = load_job(QUICKSTART, overrides(tmp_path, "auto"))
    data = job.model_dump(mode="json")
    auto = {"kind": "auto", "device": "H100-80GB", "candidates": ["single"]}
    resolved, _ = resolve_auto(validate_job({**data, "strategy": auto}), local=True)
    assert resolved.strategy.model_dump() == {"kind": "single"}
    unknown = validate_job({**data, "strategy": {**auto, "candidates": ["nope"]}})
    with pytest.raises(JobFileError, match=r"unknown strategy kind\(s\) 'nope'.*available: "):
        resolve_auto(unknown, local=True)


# --- the planner and the calibration room name no strategy ------------------------------------


def strategy_mentions(tree: ast.AST) -> list[str]:
    """Strategy names in code: built-in kinds as strings, `["kind"]` lookups, `.kind`
    comparisons, and `*StrategyConfig` classes (imported or tested with `isinstance`)."""
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and node.value in BUILT_IN_KINDS:
            found.append(f"{line}: string {node.value!r}")
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            if node.slice.value == "kind":
                found.append(f"{line}: ['kind'] lookup")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides):
                found.append(f"{line}: .kind comparison")
        elif isinstance(node, ast.Name | ast.alias):
            name = node.id if isinstance(node, ast.Name) else node.name
            if name.endswith("StrategyConfig"):
                found.append(f"{line}: {name}")
    return found


def test_the_strategy_check_finds_each_kind_of_mention() -> None:
    code = (
        "from roundhouse.config import PSStrategyConfig\n"
        "if job.strategy.kind == x: pass\n"
        "y = c.strategy['kind']\n"
        "z = isinstance(s, DeepSpeedStrategyConfig)\n"
        "w = 'deepspeed'\n"
        'v = "a docstring naming ps and deepspeed is prose"\n'
    )
    assert len(strategy_mentions(ast.parse(code))) == 5


def test_planner_and_calibration_name_no_strategy() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{mention}"
        for room in PURE_ROOMS
        for path in sorted(room.rglob("*.py"))
        for mention in strategy_mentions(ast.parse(path.read_text()))
    ]
    assert found == []


# --- each strategy prices its own rows ---------------------------------------------------------


SHAPE = JobShape(global_batch=64, grad_accum_steps=2, optimizer_moments=2)
PROFILE = ModelProfile(1_000_000, 100_000, 0.0, 1e6, 1e5, 1e4, num_heads=4)


def h100() -> Target:
    step = StepRate(0.0, 1e-3, 1e-3)
    return Target("test", 80e9, lambda: step, LinkRate(20e-6, 25e9), overlap=True)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_every_row_is_a_valid_section_of_the_kind_whose_cost_model_made_it(workers: int) -> None:
    rows = enumerate_candidates(workers, PROFILE, SHAPE)
    assert rows and len({(r.label, r.workers) for r in rows}) == len(rows)
    for row in rows:
        section = JobSpec.model_validate({"strategy": row.strategy, **minimal_job()}).strategy
        assert registry.get_strategy_class(section).cost_model is type(row.costs)
        assert row.topology == SHAPE.topology(section, workers)  # the one layout


def minimal_job() -> dict:
    return {
        "name": "rows",
        "model": {"name": "mlp"},
        "data": {"source": "builtin:digits", "batch_size": 64},
        "trainer": {"max_steps": 1},
    }


def test_a_deepspeed_row_without_zero_stage_is_priced_at_the_schemas_default() -> None:
    bare = candidate("ds", 4, {"kind": "deepspeed"}, SHAPE)
    two = candidate("zero2", 4, {"kind": "deepspeed", "zero_stage": 2}, SHAPE)
    zero = candidate("zero0", 4, {"kind": "deepspeed", "zero_stage": 0}, SHAPE)
    memory = [c.costs.memory(c, PROFILE, h100(), SHAPE).total for c in (bare, two, zero)]
    assert memory[0] == memory[1] != memory[2]
    compute = [c.costs.compute_s(c, PROFILE, h100(), SHAPE) for c in (bare, two, zero)]
    assert compute[0] == compute[1] < compute[2]  # ZeRO >= 1 steps only its partition


def test_a_candidate_micro_batch_is_its_topologys() -> None:
    tp = candidate("tp2", 4, {"kind": "deepspeed", "tensor_parallel": 2}, SHAPE)
    assert tp.data_parallel == 2 and tp.micro_batch == 64 / (2 * 2)
    assert tp.topology.micro_batch_exact == tp.micro_batch


# --- one layout object per worker ---------------------------------------------------------------


def test_the_worker_carries_one_topology_the_strategy_and_sampler_read(tmp_path: Path) -> None:
    from roundhouse.runs.rundir import run_dir_of
    from roundhouse.trainer.run import build_trainer
    from roundhouse.weights.checkpoint import Checkpointer

    job = load_job(QUICKSTART, overrides(tmp_path, "single"))
    job = validate_job({**job.model_dump(mode="json"), "storage": {"path": str(tmp_path)}})
    job = job.model_copy(update={"storage": job.storage.model_copy(update={"run_id": "t"})})
    trainer = build_trainer(
        job,
        build_local_context("cpu"),
        Checkpointer(run_dir_of(job), keep_last=1, identity={}),
        None,
    )
    try:
        topology = trainer.strategy.topology
        assert topology == Topology.of_job(job, 1) and trainer.strategy.ctx.topology is topology
        plan = BatchPlan.of_topology(len(trainer.splits.train), topology)
        assert len(trainer.train_loader) == plan.num_steps
        assert trainer.strategy.data_parallel_size == topology.data_parallel == 1
    finally:
        trainer.strategy.close()
        trainer.tracker.close()
