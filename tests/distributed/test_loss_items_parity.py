"""Losses averaged over a data-dependent number of items are normalised by the global batch's
count (`Task.loss_items`), so ragged data trains to `single`'s weights under every strategy.

seq2seq on byte targets of `tgt_len: 64`: rows of different lengths, so the two ranks of each
step hold different numbers of target tokens (asserted below). Before the global count, ring,
ps and ZeRO 0-2 ended ~2e-3 away from `single` after 3 Adam steps, and gradient accumulation
(a mean of micro-batch means) away from one micro-batch. BERT's masked LM selects a
data-dependent number of positions per sample, so the ranks' masked counts differ as well.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse import models
from roundhouse.config.loading import validate_job
from roundhouse.data.sampler import BatchPlan, epoch_order
from roundhouse.data.splits import build_splits
from roundhouse.parallel.ps.manager import shard_manager
from roundhouse.trainer.task import build_job_task
from roundhouse.trainer.tasks_seq2seq import Seq2SeqTask
from roundhouse.weights.run_folder import prepare_run
from tests.distributed.test_live_recovery import train as live_train
from tests.distributed.test_ps_training import global_steps_per_epoch
from tests.distributed.test_ps_training import train_rank as ps_rank
from tests.distributed.test_ring_training import assert_close_weights, make_job
from tests.distributed.test_seq2seq_parity import STRATEGIES, TIMEOUT_S, train
from tests.helpers.dist import run_distributed
from tests.helpers.runs import final_weights, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2 * TIMEOUT_S)]

BATCH = 16


class TeacherForcedSeq2Seq(Seq2SeqTask):
    """`seq2seq` without the greedy decodes of evaluation (BLEU): 64-step decodes of the
    splits would take minutes on a shared CPU, and the training step is the task's own."""

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits of the shifted-right target, in training and evaluation alike."""
        return model(batch["input"], batch["target"][:, :-1])


def ragged_s2s_job(storage: Path, run_id: str, strategy: dict[str, Any], **over: Any) -> dict:
    """seq2seq:debug on pydoc-pairs, byte targets up to 64 (ragged rows), 3 Adam steps."""
    job = make_job(
        storage,
        run_id,
        model={"name": "seq2seq", "flavor": "debug"},
        data={
            "source": "builtin:pydoc-pairs",
            "options": {"src_len": 24, "tgt_len": 64},
            "batch_size": BATCH,
            "eval_batch_size": 512,
        },
        **{
            "trainer__max_steps": 3,
            "trainer__optimizer": {"name": "adam", "lr": 0.001},
            "task__name": "tests.distributed.test_loss_items_parity:TeacherForcedSeq2Seq",
            **over,
        },
    )
    job["name"] = "s2s_ragged"
    job["strategy"] = strategy
    return job


def mlm_job(storage: Path, run_id: str, strategy: dict[str, Any], **over: Any) -> dict:
    """bert:debug as a masked LM on pytext (15% of positions, chosen by a hash: ragged)."""
    job = make_job(
        storage,
        run_id,
        model={"name": "bert", "flavor": "debug"},
        data={
            "source": "builtin:pytext",
            "options": {"seq_len": 32, "max_bytes": 60_000},
            "batch_size": BATCH,
            "eval_batch_size": 256,
        },
        **{"trainer__max_steps": 3, "trainer__optimizer": {"name": "adam", "lr": 0.001}, **over},
    )
    job["name"] = "mlm_ragged"
    job["strategy"] = strategy
    return job


def rank_items(job: dict, world_size: int, accum: int = 1) -> list[list[int]]:
    """Each micro-batch's loss items of the first global batch, per (rank, micro-batch)."""
    spec = validate_job(job)
    splits = build_splits(spec.data, spec.trainer.seed)
    task = build_job_task(spec, splits.info)
    plan = BatchPlan(len(splits.train), BATCH, world_size, accum, True)
    seed, shuffle = spec.trainer.seed, spec.data.shuffle
    order = epoch_order(len(splits.train), seed=seed, epoch=0, shuffle=shuffle).tolist()
    counts = []
    for rank in range(world_size):
        bounds = plan.micro_bounds(0, rank)
        batches = [splits.train.__getitems__(order[lo:hi]) for lo, hi in bounds]
        counts.append([int(task.loss_items(b)) for b in batches])
    return counts


@pytest.fixture(scope="module")
def s2s_single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    job = ragged_s2s_job(tmp_path_factory.mktemp("single"), "single", {"kind": "single"})
    return train(job)[0]


def test_the_ragged_data_gives_the_ranks_different_token_counts(tmp_path: Path) -> None:
    job = ragged_s2s_job(tmp_path, "counts", {"kind": "single"})
    (a,), (b,) = rank_items(job, 2)
    assert a != b, "both ranks hold the same number of target tokens: the test shows nothing"
    (m1, m2), _ = rank_items(job, 2, accum=2)
    assert m1 != m2  # the micro-batches of accumulation differ too
    job = mlm_job(tmp_path, "mlm_counts", {"kind": "single"})
    (a,), (b,) = rank_items(job, 2)
    assert a != b


RAGGED_STRATEGIES = {**STRATEGIES, "zero3": {"kind": "deepspeed", "zero_stage": 3}}


@pytest.mark.parametrize("name", list(RAGGED_STRATEGIES))
def test_ragged_seq2seq_on_two_ranks_equals_single(
    tmp_path: Path, name: str, s2s_single: Path
) -> None:
    run, _ = train(ragged_s2s_job(tmp_path, name, RAGGED_STRATEGIES[name]))
    assert_close_weights(final_weights(run), final_weights(s2s_single))


def test_ragged_seq2seq_in_exact_ring_mode_equals_single(tmp_path: Path, s2s_single: Path) -> None:
    # Exact mode sums fixed shards' gradients itself, weighted by each shard's loss items.
    strategy = {"kind": "ring", "exact": True, "virtual_shards": 4}
    run, _ = train(ragged_s2s_job(tmp_path, "exact", strategy))
    assert_close_weights(final_weights(run), final_weights(s2s_single))


@pytest.mark.parametrize("name", ["single", "ring"])
def test_ragged_seq2seq_accumulating_two_micro_batches_equals_one(
    tmp_path: Path, name: str, s2s_single: Path
) -> None:
    strategy = {"kind": "single"} if name == "single" else STRATEGIES[name]
    job = ragged_s2s_job(tmp_path, f"accum_{name}", strategy, trainer__grad_accum_steps=2)
    run, _ = train(job)
    assert_close_weights(final_weights(run), final_weights(s2s_single))
    if name == "single":  # the logged loss is the global batch's token mean, as one batch's
        ours, theirs = (train_losses(r) for r in (run, s2s_single))
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
        assert ours


def train_losses(run: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run) if "train/loss" in m]


def test_masked_lm_on_two_ring_ranks_and_accumulating_equals_single(tmp_path: Path) -> None:
    """8 steps of 128 chunks over 643: the run crosses into epoch 1, where dynamic masking
    draws every sample's mask afresh (on each rank, from the sample and the epoch alone)."""
    over = {
        "data__batch_size": 128,
        "data__options": {"seq_len": 32, "max_bytes": 30_000},
        "trainer__max_steps": 8,
    }
    reference, _ = train(mlm_job(tmp_path / "single", "single", {"kind": "single"}, **over))
    assert {m.get("epoch") for m in read_metrics(reference)} >= {0, 1}
    runs = [
        mlm_job(tmp_path / "ring", "ring", STRATEGIES["ring"], **over),
        mlm_job(
            tmp_path / "accum", "accum", {"kind": "single"}, trainer__grad_accum_steps=2, **over
        ),
    ]
    for job in runs:
        run, _ = train(job)
        assert_close_weights(final_weights(run), final_weights(reference))


class KillerSeq2Seq(nn.Module):
    """`seq2seq:debug` whose worker launched as `kill_rank` SIGKILLs itself at training forward
    `at_call` (mid-step), for live recovery on ragged targets."""

    def __init__(self, inner: nn.Module, kill_rank: int, at_call: int) -> None:
        super().__init__()
        self.inner = inner
        self.member = dist.get_rank() if dist.is_initialized() else 0  # the launch rank
        self.kill_rank, self.at_call, self.calls = kill_rank, at_call, 0

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        if self.training:
            self.calls += 1
            time.sleep(0.05)  # the peers are waiting in the step's collectives when it dies
            if self.calls == self.at_call and self.member == self.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(src, tgt)


def killer_seq2seq(
    input_shape: tuple[int, ...], num_classes: int, kill_rank: int = 2, at_call: int = 0
) -> nn.Module:
    config = models.BuildConfig(flavor="debug", input_shape=input_shape, num_classes=num_classes)
    return KillerSeq2Seq(models.build_model("seq2seq", config), kill_rank, at_call)


def test_live_recovery_on_ragged_targets_keeps_the_global_token_count(tmp_path: Path) -> None:
    """3 ring workers, one SIGKILLed in step 3: the 2 survivors redo the step with the same
    global batch, count its tokens again among themselves, and end on `single`'s weights."""
    jobs = []
    for name, at_call, strategy in (
        ("single", 0, {"kind": "single"}),
        ("live", 3, {"kind": "ring", "bucket_mb": 0.01}),
    ):
        job = ragged_s2s_job(tmp_path / name, name, strategy, trainer__max_steps=5)
        job["model"] = {
            "name": "tests.distributed.test_loss_items_parity:killer_seq2seq",
            "flavor": "default",
            "options": {"kill_rank": 2, "at_call": at_call},
        }
        job["data"]["batch_size"] = 18  # 6 rows a worker, 9 a survivor
        jobs.append(job)
    jobs[1]["cluster"] = {"num_workers": 3, "recovery": "live", "collective_timeout_s": 60}
    jobs[1]["storage"].pop("run_id")
    reference, _ = train(jobs[0])
    run, survivors = live_train(jobs[1], {2})
    assert sorted(survivors) == [0, 1]
    assert all(world == 2 for _, world, _ in survivors.values())
    assert_close_weights(final_weights(run), final_weights(reference))


def test_async_ps_on_ragged_targets_exchanges_no_count(tmp_path: Path) -> None:
    """ps async has no common step: each worker normalises by its own tokens and never waits
    for the others (a count exchanged per step would hang ranks that take different numbers
    of steps, as a slowed worker does here)."""
    strategy = {"kind": "ps", "num_servers": 1, "mode": "async", "node_aggregation": False}
    strategy["slow_worker"] = {"rank": 1, "factor": 4.0}
    job = ragged_s2s_job(tmp_path, "async", strategy, trainer__max_steps=None)
    job["trainer"]["max_epochs"] = 1
    job["data"]["batch_size"] = 128  # ~25 global steps: ~50 chunks shared by the two workers
    prepared = prepare_run(validate_job(job))
    with shard_manager() as address:
        results = run_distributed(ps_rank, 2, TIMEOUT_S, job, 1, address, False)
    steps = [int(r["train/steps"]) for r in results]
    assert sum(steps) == 2 * global_steps_per_epoch(prepared.job)  # every chunk trained once
    assert steps[0] > steps[1]  # the workers took different numbers of steps
    weights = final_weights(Path(prepared.run_dir.url))
    assert all(bool(t.isfinite().all()) for t in weights.values())
