"""`seq2seq` on builtin:pydoc-pairs trains under ring, ps and DeepSpeed ZeRO 0-2 on 2 gloo ranks
to the weights `single` reaches (same job, same global batch, Adam), and every strategy reports
the same corpus BLEU (its n-gram counts add up over ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from roundhouse.config.loading import validate_job
from roundhouse.parallel.ps.manager import shard_manager
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_ps_training import train_rank as ps_rank
from tests.distributed.test_ring_training import assert_close_weights, make_job, node_context
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights

TIMEOUT_S = 400
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * TIMEOUT_S)]

STRATEGIES = {
    "ring": {"kind": "ring", "bucket_mb": 0.01},
    "ps": {"kind": "ps", "num_servers": 1},
    "zero0": {"kind": "deepspeed", "zero_stage": 0},
    "zero1": {"kind": "deepspeed", "zero_stage": 1},
    "zero2": {"kind": "deepspeed", "zero_stage": 2},
}


def s2s_job(storage: Path, run_id: str, strategy: dict[str, Any]) -> dict:
    job = make_job(
        storage,
        run_id,
        model={"name": "seq2seq", "flavor": "debug"},
        data={
            "source": "builtin:pydoc-pairs",
            "options": {"src_len": 24, "tgt_len": 12},
            "batch_size": 16,
            "eval_batch_size": 512,
        },
        trainer__max_steps=3,
        trainer__optimizer={"name": "adam", "lr": 0.001},  # Adam amplifies rounding: small lr
    )
    job["name"] = "s2s"
    job["strategy"] = strategy
    return job


def rank_fn(rank: int, world_size: int, job: dict) -> dict:
    return run_worker(validate_job(job), node_context(rank, world_size, world_size))


def train(job: dict) -> tuple[Path, dict]:
    prepared = prepare_run(validate_job(job))
    kind = job["strategy"]["kind"]
    if kind == "single":
        summary = run_worker(prepared.job, build_local_context("cpu"))
    elif kind == "ps":
        with shard_manager() as address:
            summary = run_distributed(ps_rank, 2, TIMEOUT_S, job, 1, address, False)[0]
    else:
        summary = run_distributed(rank_fn, 2, TIMEOUT_S, prepared.job.model_dump())[0]
    return Path(prepared.run_dir.url), summary


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return train(s2s_job(tmp_path_factory.mktemp("single"), "single", {"kind": "single"}))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_seq2seq_on_two_ranks_equals_single(
    tmp_path: Path, name: str, single: tuple[Path, dict]
) -> None:
    run, summary = train(s2s_job(tmp_path, name, STRATEGIES[name]))
    reference, reference_summary = single
    assert_close_weights(final_weights(run), final_weights(reference))
    assert summary["test/bleu"] == pytest.approx(reference_summary["test/bleu"], abs=1e-3)
    assert summary["test/loss"] == pytest.approx(reference_summary["test/loss"], abs=1e-4)


def test_word_pieces_on_two_ring_ranks_equal_single(tmp_path: Path) -> None:
    runs = []
    for name, strategy in (("single", {"kind": "single"}), ("ring", STRATEGIES["ring"])):
        job = s2s_job(tmp_path / name, name, strategy)
        job["data"]["source"] = "builtin:unicode-pairs"
        # tgt_len 2: one piece + EOS per row, a short run. Ragged targets (ranks holding
        # different token counts): tests/distributed/test_loss_items_parity.py.
        job["data"]["options"] = {"src_len": 12, "tgt_len": 2, "tokenizer": "words"}
        runs.append(train(job))
    (run, summary), (reference, reference_summary) = runs[1], runs[0]
    assert_close_weights(final_weights(run), final_weights(reference))
    assert summary["test/bleu"] == pytest.approx(reference_summary["test/bleu"], abs=1e-3)
