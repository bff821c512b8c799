"""Every model in the zoo trains under `ring` on 2 gloo ranks, and the replicas stay identical.

The parity tests (test_ring_training.py) check the arithmetic on one model; this one checks
that nothing in any model (unused parameters, buffers, tied weights, experts, recurrent cells)
breaks bucketing, the backward hooks or the broadcast of the initial parameters.
"""

from __future__ import annotations

import pytest
import torch

from roundhouse import models
from roundhouse.config import LossConfig, OptimizerConfig, RingStrategyConfig, SchedulerConfig
from roundhouse.data.text import VOCAB_SIZE
from roundhouse.parallel.base import TrainPlan
from roundhouse.parallel.context import WorkerContext
from roundhouse.parallel.ring.strategy import RingStrategy
from roundhouse.trainer.optim import build_optimizer, build_scheduler
from roundhouse.trainer.task import build_task
from tests.helpers.dist import run_distributed

TOKEN_TASKS = ("language_model", "masked_lm")
TOKEN_CLASSIFIERS = ("fasttext",)  # classification over (T,) tokens
TEXT_LABEL_TASKS = ("text_classification", "token_classification")
SEQ_LEN = 16
IMAGE = (1, 16, 16)  # digits upsampled, as the diffusion configs use them
STEPS = 2


# Latent diffusion needs a trained stage-1 VAE run; its denoiser is the `ddpm` model's UNet.
NEEDS_A_RUN = {"ldm"}


def zoo() -> list[str]:
    return [spec.name for spec in models.list_models() if spec.name not in NEEDS_A_RUN]


def example(spec: models.ModelSpec, rank: int) -> tuple[tuple[int, ...], int, dict]:
    """(input shape, classes, a per-rank batch of 4) for the model's task."""
    gen = torch.Generator().manual_seed(rank)
    if spec.name in TOKEN_CLASSIFIERS:
        tokens = torch.randint(0, 256, (4, SEQ_LEN), generator=gen)
        return (SEQ_LEN,), 5, {"input": tokens, "target": torch.randint(0, 5, (4,), generator=gen)}
    if spec.loss in TOKEN_TASKS:
        tokens = torch.randint(0, 256, (4, SEQ_LEN + 1), generator=gen)
        return (SEQ_LEN,), VOCAB_SIZE, {"input": tokens[:, :-1], "target": tokens[:, 1:]}
    if spec.loss in TEXT_LABEL_TASKS:  # 3 labels per text, or per token
        tokens = torch.randint(0, 256, (4, SEQ_LEN), generator=gen)
        shape = (4,) if spec.loss == "text_classification" else (4, SEQ_LEN)
        return (SEQ_LEN,), 3, {"input": tokens, "target": torch.randint(0, 3, shape, generator=gen)}
    if spec.loss == "seq2seq":
        tokens = torch.randint(0, 256, (4, 2 * SEQ_LEN + 1), generator=gen)
        pair = {"input": tokens[:, :SEQ_LEN], "target": tokens[:, SEQ_LEN:]}
        return (SEQ_LEN,), VOCAB_SIZE, pair
    images = torch.rand(4, *IMAGE, generator=gen)
    return IMAGE, 10, {"input": images, "target": torch.randint(0, 10, (4,), generator=gen)}


def train_model(name: str, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    spec = models.get(name)
    shape, classes, batch = example(spec, rank)
    torch.manual_seed(rank)  # different initial weights per rank: the broadcast must fix them
    model = models.build_model(name, models.BuildConfig(input_shape=shape, num_classes=classes))
    plan = TrainPlan(
        task=build_task(spec.loss, LossConfig()),
        build_optimizer=lambda p: build_optimizer(p, config=OptimizerConfig(name="adam")),
        build_scheduler=lambda o: build_scheduler(
            o, config=SchedulerConfig(), steps_per_epoch=STEPS, total_steps=STEPS
        ),
    )
    strategy = RingStrategy(
        RingStrategyConfig(kind="ring", bucket_mb=0.05),
        WorkerContext(rank=rank, world_size=world_size),
    )
    strategy.setup(model, plan)
    strategy.train_mode(True)
    initial = {k: v.clone() for k, v in strategy.model_state_dict().items()}
    for _ in range(STEPS):
        loss = strategy.forward_backward(batch, loss_scale=1.0, sync=True)
        assert torch.isfinite(loss), name
        strategy.optimizer_step(need_grad_norm=True)
    final = strategy.model_state_dict()
    strategy.close()
    assert any(not torch.equal(initial[k], final[k]) for k in final), f"{name} did not train"
    return {k: v for k, v in final.items() if v.is_floating_point() and "running" not in k}


def train_zoo(rank: int, world_size: int, names: list[str]) -> dict[str, dict]:
    return {name: train_model(name, rank, world_size) for name in names}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_zoo_model_trains_under_ring_with_identical_replicas() -> None:
    names = zoo()
    ranks = run_distributed(train_zoo, 2, 500, names)
    for name in names:
        for key, value in ranks[0][name].items():
            # Batch-norm running statistics are per rank (local batches); parameters are not.
            assert torch.equal(value, ranks[1][name][key]), f"{name}.{key} differs across ranks"
