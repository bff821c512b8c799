"""`Task.loss_items` and the step's weights: a task whose loss averages a data-dependent number
of items is weighted by the global batch's count; a task that declares none (a user's own, the
image tasks) keeps the sample weights, bit for bit, and no count is exchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from roundhouse.config import LossConfig, SingleStrategyConfig
from roundhouse.data.text import PAD_ID
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.single import SingleDeviceStrategy
from roundhouse.trainer.loop import Trainer
from roundhouse.trainer.losses import step_weights
from roundhouse.trainer.task import build_task
from roundhouse.trainer.task_api import Task
from roundhouse.trainer.tasks_lm import MaskedLMTask
from roundhouse.trainer.tasks_text import IGNORE_LABEL


class MeanPerSample(Task):
    """A user's task as written before `loss_items` existed: `loss` only."""

    def loss(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return outputs.float().mean()


class CountingSingle(SingleDeviceStrategy):
    """`single` that stands in for 2 ranks holding the same count, and counts the exchanges."""

    def __init__(self) -> None:
        super().__init__(SingleStrategyConfig(kind="single"), WorkerContext(rank=0, world_size=1))
        self.exchanges = 0

    def sum_over_replicas(self, value: float) -> float | None:
        self.exchanges += 1
        return 2 * value


def test_without_items_the_scales_are_the_sample_shares_as_before() -> None:
    samples, step, dp = [3, 5], 16, 2
    weights = step_weights(samples, None, step, dp, None)
    assert weights.scales == [n / step * dp for n in samples]  # exactly the old formula
    assert weights.counts == [3.0, 5.0]


def test_items_weigh_each_micro_batch_by_its_share_of_the_global_count() -> None:
    # Rank 0 holds 7 + 13 items, rank 1 (not shown) 30: 50 in the global batch.
    weights = step_weights([4, 4], [7, 13], 16, 2, 50.0)
    assert weights.scales == pytest.approx([7 / 50 * 2, 13 / 50 * 2])
    assert weights.counts == [7.0, 13.0]
    # After the strategy divides by dp, both ranks' scales add up to one whole batch.
    other = step_weights([4, 4], [10, 20], 16, 2, 50.0)
    assert sum(weights.scales + other.scales) / 2 == pytest.approx(1.0)


def test_without_a_common_step_a_rank_keeps_its_sample_share_spread_by_items() -> None:
    weights = step_weights([4, 4], [6, 2], 16, 2, None)  # ps async: no global count
    assert sum(weights.scales) == pytest.approx(8 / 16 * 2)
    assert weights.scales[0] == pytest.approx(3 * weights.scales[1])


def test_a_global_batch_without_items_gives_zero_scales() -> None:
    assert step_weights([2, 2], [0, 0], 4, 1, 0.0).scales == [0.0, 0.0]


def test_the_trainer_exchanges_no_count_for_a_task_without_items() -> None:
    strategy = CountingSingle()
    trainer = SimpleNamespace(strategy=strategy, task=MeanPerSample(), held_items=0.0)
    batches = [{"input": torch.zeros(3, 2), "target": torch.zeros(3)} for _ in range(2)]
    weights = Trainer.step_weights(trainer, batches, 12)  # type: ignore[arg-type]
    assert strategy.exchanges == 0
    assert weights.scales == [3 / 12, 3 / 12]


def test_the_trainer_counts_a_seq2seq_steps_tokens_once_over_the_replicas() -> None:
    strategy = CountingSingle()
    trainer = SimpleNamespace(
        strategy=strategy, task=build_task("seq2seq", LossConfig()), held_items=0.0
    )
    target = torch.tensor([[1, 5, 6, 2, PAD_ID], [1, 7, 2, PAD_ID, PAD_ID]])  # 3 + 2 tokens
    batches = [{"input": target, "target": target}, {"input": target[:1], "target": target[:1]}]
    weights = Trainer.step_weights(trainer, batches, 6)  # type: ignore[arg-type]
    assert strategy.exchanges == 1
    assert weights.counts == [5.0, 3.0]
    assert weights.scales == pytest.approx([5 / 16, 3 / 16])  # of 2 x 8 tokens (2 "ranks")


def test_each_built_in_task_declares_the_items_its_loss_averages() -> None:
    tokens = torch.tensor([[10, 11, 12, PAD_ID], [13, PAD_ID, PAD_ID, PAD_ID]])
    lm = {"input": tokens, "target": tokens}
    assert build_task("language_model", LossConfig()).loss_items(lm) == 4
    seq2seq = {"input": tokens, "target": tokens}  # target[:, 1:] holds 2 real tokens
    assert build_task("seq2seq", LossConfig()).loss_items(seq2seq) == 2
    labels = torch.tensor([[0, IGNORE_LABEL, 2], [1, 1, IGNORE_LABEL]])
    token_cls = {"input": labels, "target": labels}
    assert build_task("token_classification", LossConfig()).loss_items(token_cls) == 4
    text_cls = {"input": tokens, "target": torch.tensor([0, 1])}
    assert build_task("text_classification", LossConfig()).loss_items(text_cls) == 2
    # Their losses are means over a fixed number of values per sample: per-sample weights.
    for name in ("classification", "vae", "diffusion"):
        assert build_task(name, LossConfig()).loss_items(lm) is None, name
    assert build_task("regression", LossConfig(name="mse")).loss_items(lm) is None


def test_a_masked_lm_counts_its_selected_positions() -> None:
    task = MaskedLMTask()
    tokens = torch.randint(3, 200, (4, 64), generator=torch.Generator().manual_seed(0))
    _, selected = task.masking.apply(tokens)
    count = task.loss_items({"input": tokens, "target": tokens})
    assert count == int(selected.sum())
    assert 0 < count < tokens.numel()
    per_row = selected.sum(dim=1)
    assert len(set(per_row.tolist())) > 1  # a data-dependent number per sample


def test_a_users_task_declares_no_items() -> None:
    assert MeanPerSample().loss_items({"target": torch.zeros(3)}) is None
