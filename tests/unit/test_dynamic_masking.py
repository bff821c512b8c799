"""Dynamic masking (RoBERTa's) for `masked_lm`: a fresh mask per training epoch, a fixed one for
evaluation, each a function of the sample, the seed and the epoch alone (so every rank and world
size masks alike and a resumed run masks like an uninterrupted one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from roundhouse.config.loading import validate_job
from roundhouse.data.text import MASK_ID, PAD_ID
from roundhouse.trainer import build_local_context, run_worker
from roundhouse.trainer.task import build_named_task
from roundhouse.trainer.task_api import TaskError
from roundhouse.trainer.tasks_lm import MaskedLMTask, Masking
from roundhouse.weights.run_folder import prepare_run
from tests.helpers.runs import final_weights


def tokens_of(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(300, 5000, (64, 48), generator=gen)
    tokens[7, 30:] = PAD_ID
    return tokens


def test_each_salt_is_an_independent_draw_with_the_same_proportions() -> None:
    tokens, masking = tokens_of(), Masking()
    draws = [masking.apply(tokens, salt) for salt in range(4)]
    assert torch.equal(draws[0][0], masking.apply(tokens)[0])  # salt 0: the default mask
    for salt, (corrupted, selected) in enumerate(draws):
        n = selected.sum().item()
        assert n / (tokens != PAD_ID).sum().item() == pytest.approx(0.15, abs=0.015), salt
        masked = (corrupted == MASK_ID) & selected
        assert masked.sum().item() / n == pytest.approx(0.8, abs=0.04)
        assert not selected[tokens == PAD_ID].any()
        assert torch.equal(corrupted[~selected], tokens[~selected])
    for a in range(4):
        for b in range(a + 1, 4):
            overlap = (draws[a][1] & draws[b][1]).sum().item() / draws[a][1].sum().item()
            assert overlap < 0.3, (a, b, overlap)  # independent draws share ~15% of picks


def test_a_draw_is_a_function_of_the_sample_alone() -> None:
    """Any split of a batch over ranks or micro-batches masks each sample as the whole does."""
    tokens, masking = tokens_of(), Masking()
    whole, selected = masking.apply(tokens, 5)
    part, part_selected = masking.apply(tokens[10:13], 5)
    assert torch.equal(part, whole[10:13]) and torch.equal(part_selected, selected[10:13])


def test_training_epochs_draw_afresh_and_evaluation_keeps_one_mask() -> None:
    task = MaskedLMTask()
    batch = {"input": tokens_of(), "target": tokens_of()}

    def selection() -> torch.Tensor:
        return task.targets(batch) != PAD_ID

    evaluation = selection()
    task.set_epoch(0)
    assert torch.equal(selection(), evaluation)  # epoch 0 is the static mask
    task.set_epoch(3)
    third = selection()
    assert not torch.equal(third, evaluation)
    assert task.loss_items(batch) == int(third.sum())  # the count the loop weights by
    task.set_epoch(None)
    assert torch.equal(selection(), evaluation)
    static = MaskedLMTask(dynamic=False)
    static.set_epoch(3)
    assert torch.equal(static.targets(batch) != PAD_ID, evaluation)


def job_of(storage: Path, **task: Any) -> dict:
    return {
        "name": "mlm",
        "model": {"name": "bert", "flavor": "debug"},
        "data": {
            "source": "builtin:pytext",
            "options": {"seq_len": 32, "max_bytes": 30_000},  # 643 training chunks
            "batch_size": 128,  # 6 steps an epoch
            "eval_batch_size": 512,
        },
        "trainer": {"max_epochs": 2, "optimizer": {"name": "adam", "lr": 1e-3}},
        "task": {"options": task},
        "tracking": {"wandb": {"mode": "disabled"}, "console": "off"},
        "storage": {"path": str(storage)},
    }


@pytest.mark.parametrize("options", [{"masking": "sometimes"}, {"mask_rate": 0.2}])
def test_bad_masking_options_are_one_line_errors(tmp_path: Path, options: dict) -> None:
    with pytest.raises(TaskError) as caught:
        build_named_task(validate_job(job_of(tmp_path, **options)), "masked_lm")
    assert len(str(caught.value).splitlines()) == 1


def train(job: dict, resume: bool = False) -> Path:
    prepared = prepare_run(validate_job(job), "latest" if resume else None)
    run_worker(prepared.job, build_local_context("cpu"), resume=resume)
    return Path(prepared.run_dir.url)


def test_resume_at_an_epoch_boundary_masks_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """Two epochs whole, or one epoch then a resume: the second epoch draws the same masks
    (bit-identical weights), and they are not the first epoch's (static masking differs)."""
    whole = final_weights(train(job_of(tmp_path / "whole")))
    half = job_of(tmp_path / "half")
    train({**half, "trainer": {**half["trainer"], "max_epochs": 1}})
    resumed = final_weights(train(half, resume=True))
    static = final_weights(train(job_of(tmp_path / "static", masking="static")))
    assert whole.keys() == resumed.keys() == static.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0)
    assert any(not torch.equal(static[key], whole[key]) for key in whole)
