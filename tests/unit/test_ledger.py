"""The sample ledger: a --local run verifies clean, a damaged ledger reports the right counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.launch.cli import main
from roundhouse.runs.ledger import LedgerError, LedgerWriter, drop_cut_line, verify_ledger
from roundhouse.runs.rundir import RunDir
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.preflight import preflight
from roundhouse.weights.run_folder import prepare_run


def make_job(tmp_path: Path, **trainer) -> dict:
    return {
        "name": "ledger",
        "model": {"name": "mlp", "flavor": "debug"},
        "data": {"source": "builtin:digits", "batch_size": 100},
        "trainer": {
            "max_epochs": 2,
            "log_every_steps": 50,
            "device": "cpu",
            "ledger": True,
            "optimizer": {"name": "sgd", "lr": 0.1},
            **trainer,
        },
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(tmp_path)},
    }


def train(job: dict, resume: str | None = None) -> Path:
    prepared = prepare_run(validate_job(job), resume)
    run_worker(
        prepared.job,
        build_local_context("cpu"),
        resume_step=prepared.resume_step,
        resume=resume is not None,
    )
    return Path(prepared.run_dir.url)


def ledger_lines(run: Path) -> list[str]:
    return (run / "ledger" / "rank_0.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(make_job(tmp_path_factory.mktemp("clean")))


def test_a_local_run_trains_every_sample_once_per_epoch(clean_run: Path) -> None:
    report = verify_ledger(RunDir(str(clean_run)))
    assert report.ok and [e.epoch for e in report.epochs] == [0, 1]
    meta = json.loads((clean_run / "ledger" / "meta.json").read_text())
    # Every step of the epoch (the last one partial), so every training sample once.
    assert meta["num_samples"] % meta["global_batch"] != 0
    for epoch in report.epochs:
        assert (epoch.trained, epoch.steps) == (meta["num_samples"], meta["steps_per_epoch"])


def test_a_dropped_line_is_missing_and_a_repeated_one_duplicated(
    clean_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "damaged"
    (run / "ledger").mkdir(parents=True)
    (run / "ledger" / "meta.json").write_text((clean_run / "ledger" / "meta.json").read_text())
    lines = ledger_lines(clean_run)
    # Drop step 3 of epoch 0 (100 samples); repeat step 1 of epoch 1 (100 duplicates).
    damaged = [*lines[:3], *lines[4:], lines[len(lines) // 2 + 1]]
    (run / "ledger" / "rank_0.jsonl").write_text("\n".join(damaged) + "\n")
    report = verify_ledger(RunDir(str(run)))
    assert (report.epochs[0].missing, report.epochs[0].duplicates) == (100, 0)
    assert (report.epochs[1].missing, report.epochs[1].duplicates) == (0, 100)
    assert main(["runs", "verify", str(run)]) == 1


def test_runs_verify_prints_json_and_exits_zero_on_a_clean_run(
    clean_run: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["runs", "verify", str(clean_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and (out["duplicates"], out["missing"]) == (0, 0)


def test_steps_undone_by_a_resume_do_not_count(tmp_path: Path) -> None:
    """Resuming from step 5 re-trains steps 6-8; their first lines are void, not duplicates."""
    first = train(make_job(tmp_path, max_epochs=None, max_steps=8, checkpoint={"every_steps": 5}))
    again = make_job(tmp_path, max_epochs=None, max_steps=12, checkpoint={"every_steps": 5})
    train(again, resume=str(first / "checkpoints" / "step_5"))
    report = verify_ledger(RunDir(str(first)))
    assert report.ok, report.as_dict()
    assert report.ignored_lines == 3
    assert sum(e.steps for e in report.epochs) == 12


def test_a_run_without_a_ledger_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no sample ledger"):
        verify_ledger(RunDir(str(tmp_path)))


def test_the_ledger_refuses_streamed_data_before_launch(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    shards = str(tmp_path / "shards")
    job["data"] = {"batch_size": 8, **{s: {"url": shards} for s in ("train", "val", "test")}}
    with pytest.raises(JobFileError, match=r"trainer\.ledger=true needs an in-memory"):
        preflight(validate_job(job), 1)


def test_a_line_cut_by_a_kill_is_dropped_before_another_process_appends(tmp_path: Path) -> None:
    """Live recovery hands a lost worker's rank (and its file) to another process: the line
    the lost one left half-written must not swallow the next one."""
    run_dir = RunDir(str(tmp_path))
    writer = LedgerWriter(run_dir, 0)
    writer.record({"e": 0, "s": 0, "gs": 1, "n": 2, "w": 1, "i": [0, 1]})
    writer.close()
    path = tmp_path / "ledger" / "rank_0.jsonl"
    whole = path.read_text()
    with open(path, "a") as f:
        f.write('{"e": 0, "s": 1, "gs": 2, "n"')  # killed mid-line
    writer = LedgerWriter(run_dir, 0)
    writer.record({"e": 0, "s": 1, "gs": 2, "n": 2, "w": 1, "i": [2, 3]})
    writer.close()
    lines = path.read_text().splitlines()
    assert path.read_text().startswith(whole) and len(lines) == 2
    assert [json.loads(line)["gs"] for line in lines] == [1, 2]
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(b"x" * 70000)  # no newline at all: nothing of it was committed
    drop_cut_line(str(cut))
    assert cut.read_bytes() == b""


def test_a_lost_workers_unrecorded_share_of_a_committed_step_is_recorded_once(
    tmp_path: Path,
) -> None:
    """A worker killed after a step's gradient exchange but before its ledger line: the
    survivors' rank 0 records the rest of that step (`StepLedger.record_unrecorded`), from the
    step's samples at any world size; a second call records nothing."""
    from roundhouse.data.loader import StepLoader
    from roundhouse.data.splits import build_splits
    from roundhouse.trainer.sample_ledger import StepLedger

    job = validate_job(make_job(tmp_path))
    run = train(make_job(tmp_path))
    path = run / "ledger" / "rank_0.jsonl"
    lines = [json.loads(text) for text in path.read_text().splitlines()]
    damaged = next(line for line in lines if line["e"] == 1 and line["s"] == 3)
    lost = damaged["i"][60:]  # as if a second rank trained these and died unrecorded
    damaged["i"] = damaged["i"][:60]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert verify_ledger(RunDir(str(run))).missing == len(lost) == 40

    splits = build_splits(job.data, job.trainer.seed)
    loader = StepLoader(
        splits.train,
        global_batch_size=100,
        rank=0,
        world_size=1,
        grad_accum_steps=1,
        seed=job.trainer.seed,
        shuffle=job.data.shuffle,
        drop_last=job.data.drop_last,
    )
    ledger = StepLedger(RunDir(str(run)), 0, loader)
    assert ledger.record_unrecorded(damaged["gs"]) == 40
    assert ledger.record_unrecorded(damaged["gs"]) == 0
    ledger.close()
    report = verify_ledger(RunDir(str(run)))
    assert report.ok, report.as_dict()
    filled = json.loads(path.read_text().splitlines()[-1])
    assert sorted(filled["i"]) == sorted(lost) and filled["gs"] == damaged["gs"]
